"""FlashAttention-2's deterministic backward (train.deterministic's attention) with empty sequences appended through
its variable-length form: measured, not kept (docs/benchmarks.md, the thirty-second session).

Under deterministic algorithms FA2 splits each (sequence, head) pair's keys ceil(SMs / (sequences x heads)) ways,
each split summing its own copy of dq in fp32. Appending empty sequences (one token each, the variable-length API)
changes that count without adding work. Per shape: MLA's attention (q/k 192, v 128 zero-padded to 192, causal,
bf16) through `padded_flash_attention`'s kernel, then through `aten._flash_attention_forward` with 0-6 empty
sequences; GPU ms of a forward and backward, whether two backwards agree to the bit, the gradients' difference.

    python3 bench/flash_split_probe.py [--shapes 4x2048 2x8192 1x16384] [--iters 10]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, QK, V = 16, 192, 128


def padded(q, k, v):
    """[B, T, H, width] each: FA2 through SDPA on v padded to q/k's width (the model's path)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), F.pad(v, (0, QK - V)).transpose(1, 2)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)[..., :V]


def varlen(q, k, v, empty: int):
    """The same through FA2's variable-length form, the batch's sequences followed by `empty` one-token ones."""
    B, T = q.shape[:2]
    rows = B * T
    qf, kf = (F.pad(t.reshape(rows, HEADS, QK), (0, 0, 0, 0, 0, empty)) for t in (q, k))
    vf = F.pad(v.reshape(rows, HEADS, V), (0, QK - V, 0, 0, 0, empty))
    ends = torch.cat([torch.arange(0, rows + 1, T), rows + torch.arange(1, empty + 1)]).to(torch.int32).cuda()
    out = torch.ops.aten._flash_attention_forward(qf, kf, vf, ends, ends, T, T, 0.0, True, False, scale=QK ** -0.5)[0]
    return out[:rows, :, :V].view(B, T, HEADS, V)


def measure(fn, inputs, grad_out, iters: int):
    first = torch.autograd.grad(fn(*inputs), inputs, grad_out)
    same = all(torch.equal(a, b) for a, b in zip(first, torch.autograd.grad(fn(*inputs), inputs, grad_out)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.autograd.grad(fn(*inputs), inputs, grad_out)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters, same, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["4x2048", "2x8192", "1x16384"], help="BATCHxSEQ")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = {}
    for shape in args.shapes:
        B, T = map(int, shape.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, grad_out = (torch.randn(B, T, HEADS, w, device="cuda", dtype=torch.bfloat16, generator=gen)
                             for w in (QK, QK, V, V))
        inputs = tuple(t.requires_grad_() for t in (q, k, v))
        torch.use_deterministic_algorithms(False)
        results[f"{shape}/padded/off"] = measure(padded, inputs, grad_out, args.iters)[0]
        torch.use_deterministic_algorithms(True)
        ms, same, reference = measure(padded, inputs, grad_out, args.iters)
        results[f"{shape}/padded/strict"] = ms
        print(f"{shape}: padded flash {results[f'{shape}/padded/off']:.3f} ms, strict {ms:.3f} (repeats: {same})")
        for empty in (0, 1, 2, 3, 4, 6):
            ms, same, grads = measure(lambda *t, e=empty: varlen(*t, e), inputs, grad_out, args.iters)
            diff = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(grads, reference))
            splits = -(-sms // ((B + empty) * HEADS))
            results[f"{shape}/varlen+{empty}/strict"] = ms
            print(f"{shape}: varlen, {empty} empty sequences ({splits} splits) {ms:.3f} ms (repeats: {same}, "
                  f"gradients' relative difference from padded {diff:.1e})", flush=True)
    print(json.dumps({"torch": torch.__version__, "sms": sms, "ms": results}))


if __name__ == "__main__":
    main()
