"""Which parameters' gradients change between repeats of one micro-step, in one process and between processes: where
a GPU run stops being reproducible to the bit.

    python3 bench/grad_determinism.py [--config configs/bench-2b.yaml] [--repeats 3] [--digests OUT.json]
        [--against EARLIER.json] [--attention cudnn|efficient|math] [--deterministic-algorithms [warn|strict]]
        [key=value ...]

One process builds the engine as training does (build_engine), draws one batch of random tokens, and computes the
loss and every parameter's gradient `--repeats` times with the same weights (torch.autograd.grad, no optimizer
step). It runs at parallel.zero_stage=1 (stage 0 is fp32 only): ZeRO-3's leaf-module hooks refuse autograd.grad, and
stage 1 touches no gradient before the optimizer step: what differs is what the model's kernels computed. Prints, per parameter whose gradient differed between
repeats, how many values and by how much; `--digests` keeps a digest of each first-repeat gradient, and `--against`
compares them with another process's (compiled kernels, autotuned picks and cached plans may differ between
processes, not between repeats). Last, one JSON line.

`--attention` puts one SDPA backend first (the model's order is cuDNN, efficient, flash, math);
`--deterministic-algorithms` calls torch.use_deterministic_algorithms(True, warn_only=True) first, `... strict` with
warn_only=False (on a GPU both need CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment). Only the strict form changes
kernels: SDPA then passes over cuDNN, and the efficient kernel's backward stops splitting the keys between programs
(PyTorch's sdp_utils.cpp and attention_backward.cu); an op with no deterministic kernel raises, naming itself. What
these found on the H100 is in docs/benchmarks.md."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

from deepseek_pt.config import load_config  # noqa: E402
from deepseek_pt.engine.distributed import init_distributed  # noqa: E402
from deepseek_pt.model import mla  # noqa: E402
from deepseek_pt.train import build_engine  # noqa: E402

FIRST_BACKEND = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH}


def digest(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha256(t.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def differences(first: list[torch.Tensor | None], other: list[torch.Tensor | None], names: list[str]) -> dict:
    """Per parameter whose gradient differs between two repeats: how many values, and by how much."""
    out = {}
    for name, a, b in zip(names, first, other, strict=True):
        if a is None or b is None:
            if (a is None) != (b is None):
                out[name] = {"values": "a gradient in one repeat only"}
            continue
        a, b = a.float(), b.float()
        differ = a != b
        if differ.any():
            out[name] = {"values": int(differ.sum()), "of": a.numel(),
                         "max_abs_diff": (a - b).abs().max().item(), "max_abs_grad": a.abs().max().item()}
    return out


def compare_digests(mine: dict[str, str | None], theirs: dict[str, str | None]) -> list[str]:
    """The keys (the loss, parameter names) whose digests differ between two processes, or that only one has."""
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/bench-2b.yaml"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--digests", type=Path, help="write the first repeat's digests here (JSON)")
    p.add_argument("--against", type=Path, help="compare the digests with this file, another process's")
    p.add_argument("--attention", choices=sorted(FIRST_BACKEND), help="this SDPA backend first")
    p.add_argument("--deterministic-algorithms", nargs="?", const="warn", choices=["warn", "strict"])
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error(f"--repeats: {args.repeats}; two at least, or there is nothing to compare")
    return args


def main() -> None:
    args = parse_args()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29562"}.items():
        os.environ.setdefault(k, v)
    if args.deterministic_algorithms:
        torch.use_deterministic_algorithms(True, warn_only=args.deterministic_algorithms == "warn")
    if args.attention:
        first = FIRST_BACKEND[args.attention]
        mla.SDPA_PRIORITY = [first, *(b for b in mla.SDPA_PRIORITY if b != first)]
    cfg = load_config(args.config, [*args.overrides, "parallel.zero_stage=1", "parallel.coalesce_grad_reduction=false",
                                    "train.grad_accum_steps=1"])
    _, world, device = init_distributed(cfg)
    model = build_engine(cfg, world).module
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    names, params = map(list, zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True))

    def repeat() -> tuple[float, list[torch.Tensor | None]]:
        loss = model(inputs, targets)
        return loss.item(), list(torch.autograd.grad(loss, params, allow_unused=True))

    (loss, grads), *others = [repeat() for _ in range(args.repeats)]
    losses = [loss] + [other_loss for other_loss, _ in others]
    differing = {}
    for _, other in others:
        for name, d in differences(grads, other, names).items():
            differing.setdefault(name, d)
    print(f"losses of the {args.repeats} repeats: {', '.join(repr(x) for x in losses)}")
    print(f"gradients that differ between repeats: {len(differing)} of {len(names)}")
    for name, d in differing.items():
        print(f"  {name}: {d}")
    digests = {"loss": digest(torch.tensor(loss)), **{n: digest(g) for n, g in zip(names, grads, strict=True)}}
    if args.digests:
        args.digests.write_text(json.dumps(digests, indent=1))
    report = {"params": len(names), "losses": losses, "differ_between_repeats": differing}
    if args.against:
        report["differ_from_against"] = compare_digests(digests, json.loads(args.against.read_text()))
        print(f"differ from {args.against}: {len(report['differ_from_against'])}: {report['differ_from_against']}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
