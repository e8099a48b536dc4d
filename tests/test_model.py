import math

import pytest
import torch

from deepseek_pt.model import MLA, Transformer, to_output_subspace, to_plain_output
from deepseek_pt.model.counting import count_params, meta_model, train_flops_per_token
from deepseek_pt.model.moe import Gate, MoE
from deepseek_pt.model.rope import inv_frequencies, softmax_scale
from model_configs import tiny

torch.manual_seed(0)


def _ids(cfg, B=2, T=20, seed=0):
    return torch.randint(0, cfg.model.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(dtype):
    cfg = tiny()
    model = Transformer(cfg.model).to(dtype)
    ids = _ids(cfg)
    logits = model(ids)
    assert logits.shape == (2, 20, cfg.model.vocab_size) and logits.dtype == dtype
    loss = model(ids, ids)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    # Balancing state stays fp32 in a bf16 model's router only if the engine keeps it so; here it follows .to().
    moe = model.moe_layers()[0]
    assert moe.tokens_per_expert.sum().item() == 2 * 2 * 20 * cfg.model.moe.top_k


def test_every_parameter_gets_a_gradient():
    cfg = tiny(mtp_depth=1, moe__seq_aux_loss_alpha=0.01)
    model = Transformer(cfg.model)
    ids = _ids(cfg, B=4, T=32)
    model(ids, ids).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # Experts nobody was routed to legitimately get zero gradient; everything else must learn.
    assert all(".experts." in n for n in missing), missing
    assert set(model.last_losses) == {"lm_loss", "mtp_loss", "balance_loss"}


@pytest.mark.parametrize("q_lora", [0, 24])
def test_absorbed_attention_equals_plain(q_lora):
    cfg = tiny(attention__q_lora_rank=q_lora)
    attn = MLA(cfg.model)  # on its own, outside our Transformer
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 24, cfg.model.dim)
    plain = attn(x)
    cache = Transformer(cfg.model).new_caches(2, 24)[0]
    absorbed = attn(x, cache=cache, start_pos=0)
    torch.testing.assert_close(absorbed, plain, rtol=1e-4, atol=1e-5)
    # The cache holds only the latent and the rotary key: kv_lora_rank + rope dim per token.
    assert cache.kv.shape[-1] + cache.pe.shape[-1] == cfg.model.attention.kv_lora_rank + cfg.model.attention.qk_rope_head_dim


@pytest.mark.parametrize("v_dim", [8, 16], ids=["v-narrower", "v-wider"])  # than q/k (12); bench-2b's is narrower
def test_attention_under_deterministic_algorithms_equals_the_default_path(v_dim):
    """train.deterministic's attention (flash on q, k and v zero-padded to one width, the output's padding columns
    dropped) gives the default SDPA path's output and gradients: the padding changes nothing but the kernel's
    shape."""
    cfg = tiny(attention__v_head_dim=v_dim)
    attn = MLA(cfg.model)
    x = torch.randn(2, 24, cfg.model.dim, requires_grad=True)

    def output_and_grads():
        out = attn(x)
        return (out, *torch.autograd.grad(out.square().sum(), [x, *attn.parameters()]))

    default = output_and_grads()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = output_and_grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for got, want in zip(deterministic, default, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cached_decoding_equals_full_forward():
    cfg = tiny()
    model = Transformer(cfg.model).eval()
    ids = _ids(cfg, T=24)
    full = model(ids)
    caches = model.new_caches(2, 24)
    steps = [model(ids[:, :7], caches=caches, start_pos=0)]
    steps += [model(ids[:, t:t + 1], caches=caches, start_pos=t) for t in range(7, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_mla_o_svd_full_rank_equals_mla_and_folds_back():
    cfg = tiny()
    model = Transformer(cfg.model).eval()
    ids = _ids(cfg)
    before = model(ids)
    a = cfg.model.attention
    full_rank = min(cfg.model.dim, a.n_heads * a.v_head_dim)
    errors = to_output_subspace(model, full_rank, init="svd")
    assert max(errors) < 1e-6 and model.config.attention.use_output_subspace
    assert hasattr(model.layers[0].self_attn, "o_a_proj") and not hasattr(model.layers[0].self_attn, "o_proj")
    torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-5)
    to_plain_output(model)
    torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-5)


def test_mla_o_svd_low_rank_is_the_best_rank_r_approximation():
    cfg = tiny()
    model = Transformer(cfg.model)
    w = model.layers[1].self_attn.o_proj.weight.detach().double().clone()
    r = 5
    errors = to_output_subspace(model, r, init="svd")
    s = torch.linalg.svdvals(w)
    eckart_young = (s[r:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    assert errors[1] == pytest.approx(eckart_young, rel=1e-6)
    assert model.layers[1].self_attn.o_a_proj.weight.shape == (r, cfg.model.attention.n_heads * cfg.model.attention.v_head_dim)


def test_mla_o_from_config_with_xavier_init():
    cfg = tiny(attention__use_output_subspace=True, attention__o_latent_dim=10, attention__o_init="xavier")
    model = Transformer(cfg.model)
    attn = model.layers[0].self_attn
    fan_in, fan_out = attn.o_a_proj.weight.shape[1], attn.o_a_proj.weight.shape[0]
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert attn.o_a_proj.weight.abs().max() <= bound and attn.o_a_proj.weight.std() > bound / 4
    assert model(_ids(cfg)).shape[-1] == cfg.model.vocab_size


def _gate(cfg, seed=0):
    gate = Gate(cfg.model.dim, cfg.model.moe)
    torch.nn.init.normal_(gate.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    return gate


def test_correction_bias_changes_selection_not_weights():
    cfg = tiny(moe__n_expert_groups=1, moe__n_limited_groups=1)
    gate = _gate(cfg)
    x = torch.randn(64, cfg.model.dim)
    w0, idx0, scores = gate(x)
    gate.e_score_correction_bias[3] = 10.0
    w1, idx1, _ = gate(x)
    assert (idx1 == 3).any(dim=1).all() and not (idx0 == 3).any(dim=1).all()
    # Weights are the unbiased affinities of the chosen experts, normalised and scaled.
    expected = scores.gather(1, idx1)
    expected = expected / expected.sum(1, keepdim=True) * cfg.model.moe.route_scale
    torch.testing.assert_close(w1, expected)
    gate.e_score_correction_bias[3] = -10.0
    assert not (gate(x)[1] == 3).any()


def test_group_limited_routing_stays_inside_the_chosen_groups():
    cfg = tiny(moe__n_routed_experts=16, moe__n_expert_groups=4, moe__n_limited_groups=2, moe__top_k=3)
    gate = _gate(cfg, seed=1)
    gate.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(256, cfg.model.dim)
    _, idx, scores = gate(x)
    choice = (scores + gate.e_score_correction_bias).view(256, 4, 4)
    group_score = choice.topk(2, dim=-1).values.sum(-1)
    allowed = group_score.topk(2, dim=-1).indices  # [N, 2]
    groups_of_picks = idx // 4
    assert (groups_of_picks.unsqueeze(-1) == allowed.unsqueeze(1)).any(-1).all()
    # And the picks are the best experts within those groups.
    masked = torch.full_like(choice, float("-inf"))
    masked.scatter_(1, allowed.unsqueeze(-1).expand(-1, -1, 4), choice.gather(1, allowed.unsqueeze(-1).expand(-1, -1, 4)))
    assert torch.equal(idx.sort(-1).values, masked.view(256, 16).topk(3, -1).indices.sort(-1).values)


def test_group_limited_routing_ignores_a_common_shift_of_the_biases():
    """Balancing moves each correction bias by +-rate every step, and nothing holds them near 0: they may all drift
    below -1 together. Adding one constant to every bias must change no selection and no weight.
    With every biased affinity of the kept groups below 0, dropped groups must still lose: masked to 0 rather than
    -inf they would outrank every kept expert, and each token would be routed outside its groups."""
    cfg = tiny(moe__n_routed_experts=16, moe__n_expert_groups=4, moe__n_limited_groups=2, moe__top_k=3)
    gate = _gate(cfg, seed=1)
    gate.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(256, cfg.model.dim)
    w0, idx0, _ = gate(x)
    gate.e_score_correction_bias -= 3.0  # every biased affinity now below 0
    w1, idx1, _ = gate(x)
    assert torch.equal(idx1, idx0)
    assert torch.equal(w1, w0)
    assert max(len(set(groups)) for groups in (idx1 // 4).tolist()) <= 2  # n_limited_groups


def test_moe_dispatch_equals_per_token_reference():
    cfg = tiny()
    moe = MoE(cfg.model)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 10, cfg.model.dim)
    y = moe(x)
    flat = x.view(-1, cfg.model.dim)
    w, idx, _ = moe.gate(flat)
    ref = torch.stack([sum(w[t, j] * moe.experts[idx[t, j]](flat[t]) for j in range(idx.shape[1]))
                       + moe.shared_experts(flat[t]) for t in range(flat.shape[0])])
    torch.testing.assert_close(y.view(-1, cfg.model.dim), ref, rtol=1e-4, atol=1e-5)


def test_sequence_balance_loss_matches_its_definition():
    cfg = tiny(moe__seq_aux_loss_alpha=0.1)
    moe = MoE(cfg.model).train()
    x = torch.randn(3, 12, cfg.model.dim)
    moe(x)
    _, idx, s = moe.gate(x.view(-1, cfg.model.dim))
    E, K, T = 8, 2, 12
    total = 0.0
    for b in range(3):
        sb, ib = s.view(3, T, E)[b], idx.view(3, T, K)[b]
        f = torch.stack([(ib == i).any(-1).float().sum() * E / (K * T) for i in range(E)])
        p = (sb / sb.sum(-1, keepdim=True)).mean(0)
        total += 0.1 * (f * p).sum()
    assert moe.aux_loss.item() == pytest.approx(total.item() / 3, rel=1e-5)
    assert moe.aux_loss.requires_grad


def test_yarn_keeps_high_frequencies_and_stretches_low_ones():
    cfg = tiny()
    a = cfg.model.attention
    yarn, magnitude = inv_frequencies(a)
    plain, _ = inv_frequencies(tiny(attention__rope__scaling="none").model.attention)
    assert yarn[0] == pytest.approx(plain[0].item())  # fastest rotation untouched
    assert yarn[-1] == pytest.approx(plain[-1].item() / a.rope.factor)  # slowest fully interpolated
    assert magnitude == 1.0  # mscale == mscale_all_dim
    mscale = 0.1 * math.log(a.rope.factor) + 1
    assert softmax_scale(a) == pytest.approx((a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5 * mscale ** 2)


def test_yarn_ramp_at_deepseek_v3s_shape_matches_the_formula():
    """The YaRN ramp's ends at DeepSeek-V3's published rope shape (64 rotary dims, theta 1e4, factor 40, trained on
    4096 positions, beta_fast 32, beta_slow 1): the correction dims are 10.47 and 22.51, so the ramp runs from pair
    floor(10.47) = 10 to ceil(22.51) = 23, as DeepSeek's reference and transformers round them. The tiny config's
    ramp is clamped at pair 0 either way, so it cannot tell floor from ceil; a ramp starting one pair late (pair 11
    kept whole) would rotate that pair 7% off what the released weights were trained with."""
    cfg = tiny(attention__qk_rope_head_dim=64, attention__rope__factor=40.0,
               attention__rope__original_max_position_embeddings=4096, attention__rope__mscale_all_dim=1.0)
    yarn, magnitude = inv_frequencies(cfg.model.attention)
    base = [10000.0 ** (-2 * i / 64) for i in range(32)]
    ramp = [min(max((i - 10) / 13, 0.0), 1.0) for i in range(32)]  # (i - low) / (high - low), low 10, high 23
    want = [b * (1 - r) + b / 40 * r for b, r in zip(base, ramp)]
    assert yarn.tolist() == pytest.approx(want, rel=1e-6)
    assert yarn[10].item() == pytest.approx(base[10], rel=1e-6)  # last pair kept whole
    assert yarn[11].item() == pytest.approx(base[11] * (1 - 39 / 520), rel=1e-6)  # 1/13 of the way to base / 40
    assert yarn[23].item() == pytest.approx(base[23] / 40, rel=1e-6)  # first pair fully interpolated
    assert magnitude == 1.0


def test_mtp_depth_two_trains_each_depth_on_its_targets():
    cfg = tiny(mtp_depth=2, mtp_loss_weight=0.5)
    model = Transformer(cfg.model)
    ids, targets = _ids(cfg, T=16), _ids(cfg, T=16, seed=1)  # targets unrelated to the inputs: offsets show
    loss = model(ids, targets)
    parts = model.last_losses
    assert loss.item() == pytest.approx((parts["lm_loss"] + 0.5 * parts["mtp_loss"]).item(), rel=1e-6)
    assert len(model.mtp) == 2
    # DeepSeek-V3's chain: depth k at position i combines depth k-1's normed hidden state at i with the embedding
    # of input token i+k and is scored on targets[i+k] (the token i+k+1); the MTP loss is the mean over depths.
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        h = model.embed_tokens(ids)
        for block in model.layers:
            h = block(h)
        h = model.norm(h)
        assert parts["lm_loss"].item() == pytest.approx(ce(model.lm_head(h).flatten(0, 1), targets.flatten()).item(),
                                                        rel=1e-6)
        depth_losses = []
        for k, module in enumerate(model.mtp, start=1):
            h = module.norm(module(h[:, :16 - k], model.embed_tokens(ids[:, k:])))
            depth_losses.append(ce(model.lm_head(h).flatten(0, 1), targets[:, k:].flatten()).item())
    assert parts["mtp_loss"].item() == pytest.approx(sum(depth_losses) / 2, rel=1e-6)


def test_recompute_in_backward_runs_only_the_chosen_blocks_twice_and_keeps_gradients():
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    cfg = tiny()  # blocks: 0 dense, 1 and 2 MoE
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ids = _ids(cfg)

    def grads_and_counts(layers):
        model.zero_grad()
        for moe in model.moe_layers():
            moe.tokens_per_expert.zero_()
        if layers is not None:
            model.recompute_in_backward(partial(checkpoint, use_reentrant=False), layers)
        model(ids, ids).backward()
        return ([p.grad.clone() for p in model.parameters() if p.grad is not None],
                [moe.tokens_per_expert.clone() for moe in model.moe_layers()])

    plain, (c1, c2) = grads_and_counts(None)
    chosen, (r1, r2) = grads_and_counts([1])
    # A recomputed MoE block routes its tokens again, identically: its counts double, which the sign-based
    # bias update and the max/mean load metric do not see. The other block's counts are untouched.
    assert torch.equal(r1, 2 * c1) and torch.equal(r2, c2)
    assert len(plain) == len(chosen) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, chosen))
    _, (a1, a2) = grads_and_counts(range(3))
    assert torch.equal(a1, 2 * c1) and torch.equal(a2, 2 * c2)
    model.eval()
    model.moe_layers()[0].tokens_per_expert.zero_()
    with torch.no_grad():
        model(ids)  # outside training nothing is recomputed (and nothing needs to be)
    assert torch.equal(model.moe_layers()[0].tokens_per_expert, c1)


def test_routed_expert_count_leaves_the_mtp_modules_apart_as_the_total_does():
    cfg = tiny(mtp_depth=1)
    m, moe = cfg.model, cfg.model.moe
    counts = count_params(meta_model(m))
    expert = 3 * m.dim * moe.expert_inter_dim
    assert counts["routed_expert_params"] == (m.n_layers - moe.n_dense_layers) * moe.n_routed_experts * expert
    assert counts["routed_expert_params"] < counts["total_params"]


def test_train_flops_count_the_mtp_modules_that_training_runs():
    m, S = tiny(mtp_depth=2).model, 32
    a = m.attention
    counts = count_params(meta_model(m))
    attention_per_layer = 2 * a.n_heads * S * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    # Each depth runs its module and the shared output head once more per token, and one more attention layer.
    mtp = 6 * (counts["mtp_active_params"] + 2 * m.vocab_size * m.dim) + 3 * 2 * attention_per_layer
    without = train_flops_per_token(tiny(mtp_depth=0).model, S)
    assert without == 6 * counts["active_params"] + 3 * m.n_layers * attention_per_layer
    assert train_flops_per_token(m, S) == without + mtp


def test_a_tied_embedding_counts_as_active_once_as_the_output_head():
    """The input lookup is not active compute, the output head is. Tied, one matrix is both: the total loses the
    head's vocab_size x dim, the active count loses nothing (the shared matrix is active as the head), so tied and
    untied models of one config have equal active counts, and equal training FLOPs."""
    tied, untied = tiny(tie_embeddings=True).model, tiny().model
    t, u = count_params(meta_model(tied)), count_params(meta_model(untied))
    assert u["total_params"] - t["total_params"] == untied.vocab_size * untied.dim
    assert t["active_params"] == u["active_params"]
    assert train_flops_per_token(tied, 32) == train_flops_per_token(untied, 32)


def test_mtp_active_params_count_top_k_of_the_routed_experts():
    """An MTP depth's block is a MoE block: per token it runs top_k of its n routed experts, like the main layers,
    so its active count leaves out (n - top_k) experts of 3 x dim x expert_inter_dim each (gate, up, down). The
    FLOPs test above takes mtp_active_params from count_params itself; this pins the number by hand."""
    m = tiny(mtp_depth=1).model
    moe = m.moe
    counts = count_params(meta_model(m))
    inactive = (moe.n_routed_experts - moe.top_k) * 3 * m.dim * moe.expert_inter_dim
    assert counts["mtp_params"] - counts["mtp_active_params"] == inactive
