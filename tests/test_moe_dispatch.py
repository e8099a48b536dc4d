"""AutoEP's MoE layer with its dispatch and combine fused (parallel.fused_moe_dispatch): the same padded expert rows
as AutoEP's permute, and the same outputs and gradients as its gather, permute, unpermute and top-k sum; on a GPU
through the Triton kernels. The whole layer under DeepSpeed: tests/test_autoep.py's parity runs and
tests/test_train.py's expert-parallel-1 run."""
import pytest
import torch
from deepspeed.module_inject.auto_ep_layer import (
    combine_from_routed,
    permute_by_local_expert,
    unpermute_by_local_expert,
)
from deepspeed.moe import ep_kernels
from deepspeed.ops.triton_ops import autoep_fused_token_ops

from deepseek_pt.engine.moe_dispatch import combine, dispatch, plan_dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_EXPERTS, TOP_K = 8, 3


def _routing(n_tokens: int, device: str, idle: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's top-k distinct experts (expert `idle` never chosen), their scores, and the counts per expert."""
    g = torch.Generator().manual_seed(n_tokens)
    logits = torch.randn(n_tokens, N_EXPERTS, generator=g)
    logits[:, idle] = -float("inf")
    scores, selected = logits.softmax(-1).topk(TOP_K, dim=-1)
    counts = torch.bincount(selected.reshape(-1), minlength=N_EXPERTS)
    return selected.to(device), scores.to(device), counts.to(device)


@pytest.mark.parametrize("align", [8, 16])
def test_plan_puts_each_pair_where_autoeps_permute_does(align):
    selected, _, counts = _routing(37, "cpu")
    plan = plan_dispatch(selected, counts, align)
    order = torch.argsort(selected.reshape(-1), stable=True)  # AutoEP's rows before its permute
    n = order.numel()
    n_rows = -(-(n + N_EXPERTS * align) // align) * align
    permuted, group_sizes, _ = ep_kernels.generate_permute_indices(counts, N_EXPERTS, 1, n_rows, align, use_cpu=True)
    assert torch.equal(plan.group_sizes, group_sizes)
    assert plan.group_sizes[5] == align  # the idle expert: one aligned group of padding
    padding = (permuted < 0) | (permuted >= n)
    assert torch.equal(plan.row_pair, torch.where(padding, -1, order[permuted.clamp(0, n - 1)]))
    assert torch.equal(plan.row_pair[plan.pair_row], torch.arange(n))  # each pair in exactly one row


def _autoeps(x, scores, selected, counts, experts):
    """AutoEP's routed path at expert parallelism 1 (auto_ep_layer.AutoEPMoELayer._forward), with `experts` a
    row-wise function of the padded rows."""
    order = torch.argsort(selected.reshape(-1), stable=True)
    rows, permuted, _, n = permute_by_local_expert(x[order // TOP_K], counts)
    y = unpermute_by_local_expert(experts(rows), permuted, n)
    shape = (1, x.shape[0], x.shape[1])
    if x.is_cuda:  # what training runs on a GPU (engine/ds_config.py)
        return autoep_fused_token_ops.fused_weighted_restore(y, scores, order, TOP_K, shape).reshape(x.shape)
    return combine_from_routed(y, scores, order, TOP_K, "post", "weighted_sum", shape).reshape(x.shape)


def _ours(x, scores, selected, counts, experts):
    plan = plan_dispatch(selected, counts, ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M)
    return combine(experts(dispatch(x, plan)), scores, plan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens, dim", [(64, 48), (29, 1100)])  # dim past one kernel block, ragged
def test_dispatch_and_combine_give_autoeps_outputs_and_gradients(n_tokens, dim, dtype):
    selected, scores, counts = _routing(n_tokens, DEVICE)
    torch.manual_seed(0)
    weight = torch.randn(dim, dim, device=DEVICE, dtype=dtype) / dim ** 0.5
    x0 = torch.randn(n_tokens, dim, device=DEVICE, dtype=dtype)
    grad_out = torch.randn(n_tokens, dim, device=DEVICE, dtype=dtype)

    def experts(rows):  # row-wise, with zero rows mapped to zero rows (AutoEP's padding)
        return torch.tanh(rows @ weight) + rows

    results = []
    for path in (_autoeps, _ours):
        x, s = x0.clone().requires_grad_(), scores.clone().requires_grad_()
        out = path(x, s, selected, counts, experts)
        out.backward(grad_out)
        results.append((out.detach(), x.grad, s.grad))
    (out_a, gx_a, gs_a), (out_o, gx_o, gs_o) = results
    assert torch.equal(out_o, out_a)  # the same rows through the experts, the same fp32 sums in the same order
    # A token's gradient sums its top-k rows' in fp32 either way, in another order here.
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(gx_o, gx_a, **tol)
    torch.testing.assert_close(gs_o, gs_a, rtol=1e-4, atol=1e-4 * dim ** 0.5)


def test_padding_rows_are_zero_forward_and_backward():
    """The experts see zero rows at padding, and padding rows get a zero gradient: non-finite values there would
    reach the weight gradients through their zero partners."""
    selected, scores, counts = _routing(21, DEVICE)
    plan = plan_dispatch(selected, counts, 16)
    x = torch.randn(21, 64, device=DEVICE, requires_grad=True)
    rows = dispatch(x, plan)
    padding = plan.row_pair < 0
    assert padding.sum() >= 16 and not rows[padding].any()
    y = torch.randn_like(rows)
    y[padding] = float("nan")  # what the grouped GEMM may leave past its groups
    y.requires_grad_()
    out = combine(y, scores, plan)
    assert out.isfinite().all()  # padding never read
    out.sum().backward()
    assert torch.equal(y.grad[padding], torch.zeros_like(y.grad[padding]))
