"""Auxiliary-loss-free balancing on a frozen, skewed router: the bias alone must even the load out."""
import pytest
import torch

from deepseek_pt.engine.balance import balance_biases, restore_balance_biases, update_balance
from deepseek_pt.model import Transformer
from model_configs import tiny


def test_bias_balancing_lowers_the_violation_from_a_skewed_start():
    torch.manual_seed(0)
    cfg = tiny(moe__n_expert_groups=1, moe__n_limited_groups=1)
    model = Transformer(cfg.model).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    # Skew: point expert 0's router row along each layer's mean input, so it wins nearly every token.
    inputs = {}
    hooks = [moe.gate.register_forward_hook(lambda m, args, out: inputs.__setitem__(m, args[0])) for moe in model.moe_layers()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for moe in model.moe_layers():
        x = inputs[moe.gate]
        centre = x.mean(0)
        moe.gate.weight.data[0] = 4 * centre / (x @ centre).abs().mean()
        moe.tokens_per_expert.zero_()
    violations = []
    with torch.no_grad():
        for _ in range(60):
            model(ids)
            violations.append(max(update_balance(model, rate=0.01).values()))
    assert violations[0] > 1.5
    assert max(violations[-10:]) < 0.5 * violations[0]
    assert all(moe.tokens_per_expert.sum() == 0 for moe in model.moe_layers())  # counts reset each step
    # Selection moved, gating weights did not: the bias is a selection-only term.
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    assert bias[0] < 0 and bias.dtype == torch.float32


def test_rate_zero_measures_without_moving_the_bias():
    cfg = tiny(mtp_depth=1)
    model = Transformer(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 17))
    model(ids[:, :-1], ids[:, 1:])  # with targets: the MTP block runs too
    counts = [moe.tokens_per_expert.float() for moe in model.moe_layers()]  # copies
    k = cfg.model.moe.top_k
    assert [c.sum() for c in counts] == [2 * 16 * k] * 2 + [2 * 15 * k]  # the MTP block predicts 15 of 16 positions
    # each layer's violation: the busiest expert's load over the mean load, less 1, by layer (MoE from layer 1 on)
    names = [f"expert_load/layer_{i}" for i in range(cfg.model.moe.n_dense_layers, cfg.model.n_layers)]
    names += [f"expert_load/mtp_{k}" for k in range(cfg.model.mtp_depth)]
    want = {name: (c.max() / c.mean() - 1).item() for name, c in zip(names, counts, strict=True)}
    assert min(want.values()) > 0 and update_balance(model, rate=0.0) == pytest.approx(want, rel=1e-6)
    assert all(b.abs().sum() == 0 for b in balance_biases(model))
    assert all(moe.tokens_per_expert.sum() == 0 for moe in model.moe_layers())


def test_biases_round_trip_and_layer_count_is_checked():
    cfg = tiny(n_layers=4)
    model = Transformer(cfg.model)
    saved = [torch.randn(cfg.model.moe.n_routed_experts) for _ in model.moe_layers()]
    restore_balance_biases(model, saved)
    assert all(torch.equal(a, b) for a, b in zip(balance_biases(model), saved))
    try:
        restore_balance_biases(model, saved[:1])
    except ValueError as e:
        assert "checkpoint holds 1 balancing biases, the model has 3 MoE layers" in str(e)
    else:
        raise AssertionError("layer count mismatch accepted")


def test_a_skipped_steps_counts_are_dropped_not_carried_into_the_next_update():
    """The loop did not update the biases after a skipped step but left its counts (NaN routing) to be summed into
    the next step's update."""
    torch.manual_seed(0)
    model = Transformer(tiny().model).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    def routed() -> int:
        return sum(int(moe.tokens_per_expert.sum()) for moe in model.moe_layers())

    with torch.no_grad():
        model(ids)  # the skipped step's routing
        one_step, before = routed(), balance_biases(model)
        assert update_balance(model, rate=0.01, applied=False) is None
        assert all(torch.equal(a, b) for a, b in zip(before, balance_biases(model), strict=True))
        model(ids)
        assert routed() == one_step > 0  # the next update sees its own step's counts only
