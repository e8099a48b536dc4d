"""Runs' loss curves against bf16's: the mean train loss per tenth of the steps and over the second half, each run
beside the bf16 run of its seed, then each run's speed, peak memory and held-out losses, and for a recipe run from
several seeds its gaps side by side with their mean. bench/fp8_loss_check.sh prints this for the runs it made; by
hand it compares runs from different calls too (a GPU too small to hold two runs side by side, or one call's bf16
curve kept for the next), and says so for a run whose bf16 comes from another directory: on another machine the
same run's curve differs by itself.

    python bench/loss_table.py [--steps N] DIR/metrics_bf16.jsonl OTHER_DIR/metrics_fp8_tensorwise.jsonl ...

A run's name is its file's without `metrics_` and `.jsonl`, as fp8_loss_check.sh names them; a name given twice is
refused. A run is set against the bf16 run of its seed when there is one (fp8_tensorwise_seed1 against bf16_seed1),
else against bf16 (bf16_seed1 against bf16: how far a new initialization alone moves the curve). A file that does
not exist or is empty (a run that failed before its first step) is left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_name(path: Path) -> str:
    return path.name.removeprefix("metrics_").removesuffix(".jsonl")


def recipe_and_seed(name: str) -> tuple[str, int]:
    """fp8_tensorwise_seed2 -> (fp8_tensorwise, 2); a name without _seedN is seed 0's."""
    recipe, _, seed = name.rpartition("_seed") if "_seed" in name else (name, "", "0")
    return recipe, int(seed)


def baselines(names: list[str]) -> dict[str, str | None]:
    """Each run's bf16 to compare against: its seed's, else bf16 (seed 0); None for bf16 itself."""
    base = {}
    for n in names:
        seed = recipe_and_seed(n)[1]
        own = f"bf16_seed{seed}" if "_seed" in n else "bf16"
        base[n] = own if own in names and own != n else "bf16" if "bf16" in names and n != "bf16" else None
    return base


def over_seeds(second_half: dict[str, tuple[str, float]], held_out: dict[str, float]) -> list[str]:
    """For each recipe run from two seeds or more, its gaps to its seeds' bf16 side by side and their mean: over the
    second half (`second_half`: the table's cell and its gap in %) and in held-out loss at the last evaluation (where
    every seed has one). bf16_seedN against bf16 is a new initialization, not a recipe: left out."""
    seeds: dict[str, list[tuple[int, str]]] = {}
    for n in second_half:
        recipe, seed = recipe_and_seed(n)
        if recipe != "bf16":
            seeds.setdefault(recipe, []).append((seed, n))
    lines = []
    for recipe, runs in seeds.items():
        if len(runs) < 2:
            continue
        runs.sort()
        names = [n for _, n in runs]
        line = (f"{recipe} over seeds {', '.join(str(seed) for seed, _ in runs)}: second half vs its seed's bf16 "
                f"{', '.join(second_half[n][0] for n in names)}; mean "
                f"{sum(second_half[n][1] for n in names) / len(names):+.2f}%")
        if all(n in held_out for n in names):
            line += (f"; held-out at the last evaluation {', '.join(f'{held_out[n]:+.2f}%' for n in names)}; mean "
                     f"{sum(held_out[n] for n in names) / len(names):+.2f}%")
        lines.append(line)
    return lines


def part(steps: list[int], span: range) -> str:
    """'' where `steps` cover `span`, else which of its steps they are."""
    return "" if len(steps) == len(span) else f" (steps {steps[0]}-{steps[-1]})"


def mean_loss(run: dict[int, dict], steps: list[int]) -> float:
    return sum(run[s]["loss"] for s in steps) / len(steps)


def table(runs: dict[str, dict[int, dict]], steps: int, dirs: dict[str, Path]) -> list[str]:
    """The table and the runs' lines; `dirs`, each run's directory, marks a run set against a bf16 from another one."""
    names = list(runs)
    base = baselines(names)
    compared = [n for n in names if base[n]]
    lines = ["| " + " | ".join(["steps (mean train loss)", *names, *(f"{n} vs {base[n]}" for n in compared)]) + " |",
             "|---" * (len(names) + len(compared) + 1) + "|"]
    window = max(1, steps // 10)
    spans = [range(start, min(start + window, steps + 1)) for start in range(1, steps + 1, window)]
    second_half, held_out = {}, {}
    for span in spans + [second := range(steps // 2 + 1, steps + 1)]:  # the last row: the whole second half
        # A run that stopped early has no later rows, and in the row it stopped in, its mean and its gap cover only
        # the steps it logged (the loss falls over a span, so a part of it set against the whole would mislead).
        cells = []
        for n in names:
            logged = [s for s in span if s in runs[n]]
            cells.append(f"{mean_loss(runs[n], logged):.4f}{part(logged, span)}" if logged else "-")
        rel = []
        for n in compared:
            common = [s for s in span if s in runs[n] and s in runs[base[n]]]
            gap = mean_loss(runs[n], common) / mean_loss(runs[base[n]], common) - 1 if common else None
            rel.append("-" if gap is None else f"{100 * gap:+.2f}%{part(common, span)}")
            if span is second and gap is not None:
                second_half[n] = rel[-1], 100 * gap
        lines.append("| " + " | ".join([f"{span[0]}-{span[-1]}", *cells, *rel]) + " |")
    for n, r in runs.items():
        tail = sorted(r[s]["tokens_per_s"] for s in r if s > steps // 2)
        speed = f", median tokens/s over the second half {tail[len(tail) // 2]:,.0f}" if tail else ""
        evals = {s: r[s]["eval_loss"] for s in sorted(r) if "eval_loss" in r[s]}
        line = (f"{n}: {len(r)} steps{speed}, peak memory {max(x['peak_mem_gib'] for x in r.values()):.1f} GiB"
                + (", eval loss at step " + ", ".join(f"{s}: {v:.4f}" for s, v in evals.items()) if evals else ""))
        if base[n] and (common := [s for s in evals if "eval_loss" in runs[base[n]].get(s, {})]):
            gaps = [100 * (evals[s] / runs[base[n]][s]["eval_loss"] - 1) for s in common]
            held_out[n] = gaps[-1]
            line += (f"; held-out vs {base[n]}: {gaps[-1]:+.2f}% at step {common[-1]}"
                     f" ({min(gaps):+.2f}% to {max(gaps):+.2f}% over {len(gaps)} evaluations)")
        if base[n] and dirs[n] != dirs[base[n]]:
            # The fortieth and forty-first sessions: the same bf16 run, deterministic mode and all, parted by 0.2-0.3%
            # between two H100 machines (docs/benchmarks.md).
            line += (f"; its {base[n]} from {dirs[base[n]]}, another call: if that ran on another machine, the same "
                     "run there may differ by ~0.3% alone")
        lines.append(line)
    return lines + over_seeds(second_half, held_out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics_NAME.jsonl files, one per run")
    parser.add_argument("--steps", type=int, help="the runs' train.max_steps (default: the last step any run logged)")
    args = parser.parse_args(argv)
    runs, paths = {}, {}
    for path in args.metrics:
        name = run_name(path)
        if name in paths:
            sys.exit(f"two runs named {name!r}: {paths[name]} and {path}; rename one's file")
        paths[name] = path
        if path.exists() and (records := path.read_text().splitlines()):
            runs[name] = {r["step"]: r for r in map(json.loads, records)}
    if not any(n == "bf16" or n.startswith("bf16_seed") for n in runs):
        sys.exit("no bf16 run to compare against (a metrics_bf16.jsonl or metrics_bf16_seedN.jsonl among "
                 + ", ".join(map(str, args.metrics)) + ")")
    dirs = {n: paths[n].resolve().parent for n in runs}
    print("\n".join(table(runs, args.steps or max(max(r) for r in runs.values()), dirs)))


if __name__ == "__main__":
    main()
