"""Sharded DeepSpeed checkpoints that count only once complete, verified on load.

Layout under `<run.dir>/checkpoints/`:
    step_00000020/               DeepSpeed's files (one ZeRO-3 partition per rank) + ours:
        rng/rank_R.pt            each rank's RNG state
        meta.json                written last by rank 0, after every rank finished: step, world and
                                 EP size, the settings a resume must match (model section, ZeRO
                                 stage, bf16, data.seq_len and data.seed, the loader's state: its
                                 sources' shard fingerprints and blend), and the size + sha256 of
                                 every file (the completion marker)
    step_00000020_universal/     made on demand to resume on another world size or EP size; kept, and reused
                                 while its sizes.json and meta.json still match
    latest                       the newest complete tag, replaced atomically after meta.json
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from ..fileio import (
    atomic_path,
    atomic_write_text,
    describe_os_error,
    first_line,
    free_space,
    is_disk_full,
    loads_json,
    sha256_file,
    size_text,
)
from .accelerator import on_gpu

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A missing, partial or corrupt checkpoint; the message names it."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _tag_step(tag: str) -> int | None:
    """The step of a tag_for tag; None for another name."""
    digits = tag.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def _files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != "meta.json" and not p.name.startswith("."))


def _hash_share(tag_dir: Path, names: list[str], collective: bool = True) -> dict[str, dict]:
    """Every rank hashes its share of the files and all get them all (alone: this process hashes all)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective and dist.is_initialized() else (0, 1)
    mine = {n: {"bytes": (tag_dir / n).stat().st_size, "sha256": sha256_file(tag_dir / n)} for n in names[rank::world]}
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if on_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and on_gpu():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: Path, step: int, client_state: dict, ep_size: int, keep_last: int,
         zero_init: bool = False, settings: dict | None = None, keep_every: int = 0) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. `ep_size` and `zero_init` (how the model
    was built: its partitions are laid out differently) go into meta.json with the world size: a resume that changes
    any of them goes through the universal checkpoint. `settings` (the model section, ZeRO stage, bf16, ...) go there:
    what a resume must match (engine/preflight.py's resume_mismatch). A write that fails on any rank (a full disk) raises
    CheckpointError on every rank, naming the checkpoint, the rank and the free space. Then the newest `keep_last`
    complete checkpoints stay, and those of steps that are multiples of `keep_every` (if not 0)."""
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and tag_dir.exists():  # leftovers of an interrupted save of the same step
        shutil.rmtree(tag_dir)
    dist.barrier()
    failure = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        (tag_dir / "rng").mkdir(parents=True, exist_ok=True)
        with atomic_path(tag_dir / "rng" / f"rank_{rank}.pt") as tmp:
            torch.save(rng_state(), tmp)
    except (OSError, RuntimeError) as e:  # a full disk: OSError from plain writes, RuntimeError from torch.save
        failure = (f"{tag_dir}: writing the checkpoint failed on rank {rank} ({first_line(str(e), type(e).__name__)}); "
                   f"{free_space(root)} on that filesystem. The incomplete "
                   f"{tag} (no meta.json) is ignored on resume and pruned by a later save")
    failures = [None] * world  # every rank learns of any rank's failure, so none waits for the others below
    dist.all_gather_object(failures, failure)
    if failed := next((f for f in failures if f), None):
        raise CheckpointError(failed)
    files = _hash_share(tag_dir, _files(tag_dir))
    failure = None
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": world, "ep_size": ep_size,
                "zero_init": zero_init, **({"settings": settings} if settings else {}), "files": files}
        try:
            atomic_write_text(tag_dir / "meta.json", json.dumps(meta, indent=1))
            try:
                atomic_write_text(root / "latest", tag + "\n")
            except OSError:  # `latest` cannot name it: it counts as incomplete, and `latest` names the newest complete
                (tag_dir / "meta.json").unlink(missing_ok=True)
                raise
        except OSError as e:  # a full disk, `latest` not a file: the other ranks wait below, told, not left hanging
            failure = (f"{tag_dir}: writing the checkpoint failed on rank 0 ({describe_os_error(e)}); "
                       f"{free_space(root)} on that filesystem. The incomplete "
                       f"{tag} (no meta.json) is ignored on resume and pruned by a later save")
        else:
            _prune(root, keep_last, keep_every)  # what it cannot remove stays: a later save tries again
    _raise_on_every_rank(failure)  # also the barrier: every rank returns once the save is complete
    return tag_dir


def _raise_on_every_rank(failure: str | None) -> None:
    """Collective: CheckpointError(failure) on every rank if rank 0's work failed, so that none waits for it."""
    failures = [failure]
    dist.broadcast_object_list(failures, src=0)
    if failures[0]:
        raise CheckpointError(failures[0])


def _prune(root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete complete checkpoints beyond the newest keep_last but for those of steps that are multiples of
    keep_every (if not 0), and any incomplete older one."""
    tags = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith("_universal"))
    complete = [p for p in tags if (p / "meta.json").exists()]
    keep = set(complete[-keep_last:])
    if keep_every:
        keep.update(p for p in complete if (step := _tag_step(p.name)) is not None and step % keep_every == 0)
    newest = complete[-1] if complete else None
    for p in tags:
        if p not in keep and (p in complete or (newest is not None and p.name < newest.name)):
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(p.with_name(p.name + "_universal"), ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """The `step_*` checkpoints under `root` whose save completed (their meta.json), oldest first."""
    return sorted(p.parent for p in root.glob("step_*[0-9]/meta.json"))


def resolve(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint directory to resume from: `auto` (the newest complete, if any), `none`, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoints_dir(run_dir)
        latest = root / "latest"
        # The newest complete checkpoint, which `latest` names unless a save was killed between renaming its meta.json
        # and `latest` into place (the first save: no `latest` yet); resuming an older one would roll back in place.
        complete = complete_checkpoints(root)
        if latest.exists():
            tag_dir = root / _read_latest(latest)
            if not (tag_dir / "meta.json").exists():
                # Not taken as a rollback to the newest left (the history after it may be lost by mistake), but said
                # how to go on: after a corrupt newest checkpoint was removed by hand, this is the next step.
                way = (f"name the newest complete one instead (train.resume={complete[-1]} to resume it)" if complete
                       else "no complete checkpoint is left (train.resume=none starts over)")
                raise CheckpointError(f"{latest} points to {tag_dir}, which is missing or incomplete (no meta.json); "
                                      f"{way}")
        return complete[-1] if complete else None
    tag_dir = Path(resume)
    if (tag_dir / "latest").exists() and not (tag_dir / "meta.json").exists():  # a checkpoints/ dir
        return resolve("auto", tag_dir.parent)
    if tag_dir.name.endswith("_universal"):  # its meta.json (a copy) lists its source's files: "failed verification"
        source = tag_dir.with_name(tag_dir.name.removesuffix("_universal"))
        if not source.is_dir():
            raise CheckpointError(f"train.resume: {tag_dir} is a universal checkpoint without its source {source}; "
                                  "name a step_* checkpoint")
        return resolve(str(source), run_dir)  # a resume on another layout takes the universal one kept beside it
    if not tag_dir.is_dir():
        raise CheckpointError(f"train.resume: checkpoint {tag_dir} does not exist")
    if not (tag_dir / "meta.json").exists():
        raise CheckpointError(f"train.resume: {tag_dir} is not a complete checkpoint (no meta.json)")
    return tag_dir


def _read_latest(latest: Path) -> str:
    """The tag a `latest` file names; CheckpointError naming it if it cannot be read as text (a corrupt file, a
    directory), not a UnicodeDecodeError or IsADirectoryError traceback."""
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{latest}: unreadable ({e}); name a step_* checkpoint directly") from None
    return tag


def read_meta(tag_dir: Path) -> dict:
    file = tag_dir / "meta.json"
    try:
        meta = loads_json(file.read_text())
    except (OSError, ValueError) as e:  # not text, not JSON, nested too deeply: a corrupt file, named
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "step" not in meta:
        raise CheckpointError(f"{file}: not a checkpoint meta.json (no step / files)")
    wrong = [k for k in ("step", "world_size", "ep_size") if not isinstance(meta.get(k), int) or meta[k] < 0]
    wrong += [f"files.{n}" for n, f in meta["files"].items()
              if not isinstance(f, dict) or not isinstance(f.get("bytes"), int) or not isinstance(f.get("sha256"), str)]
    if (settings := meta.get("settings")) is not None:  # what preflight's resume_mismatch reads
        if not isinstance(settings, dict):
            wrong.append("settings")
        else:
            wrong += [f"settings.{k}" for k, types in (("model", dict), ("zero_stage", int), ("bf16", bool))
                      if not isinstance(settings.get(k), types)]
            wrong += [f"settings.{k}" for k, types in (("autoep", bool), ("loader", dict))
                      if k in settings and not isinstance(settings[k], types)]
    if wrong:  # a hand-edited or foreign meta.json: named here, not a KeyError deep in the resume
        raise CheckpointError(f"{file}: missing or malformed {', '.join(wrong[:5])}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {meta['format_version']} is newer than this reader "
                              f"({FORMAT_VERSION}); update deepseek_pt")
    return meta


def verify(tag_dir: Path, collective: bool = True) -> dict:
    """Check every file of the checkpoint against meta.json: sizes, then sha256 (shared over the ranks
    when collective and a process group is up, else all in this process). Raises CheckpointError
    naming the first bad files."""
    meta = read_meta(tag_dir)
    problems = []
    for name, want in meta["files"].items():
        path = tag_dir / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, meta.json says {want['bytes']} (truncated or overwritten)")
    if not problems:
        got = _hash_share(tag_dir, sorted(meta["files"]), collective)
        problems = [f"{tag_dir / n}: sha256 mismatch (corrupt)" for n, want in meta["files"].items()
                    if got[n]["sha256"] != want["sha256"]]
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir} failed verification: " + "; ".join(problems[:5]))
    return meta


def ensure_universal(tag_dir: Path) -> Path:
    """Collective: rank 0 converts the checkpoint with DeepSpeed's ds_to_universal unless an intact conversion is
    kept beside it, the others wait. Returns the universal checkpoint's directory; CheckpointError on every rank if
    the conversion failed."""
    failure = None
    if dist.get_rank() == 0 and kept_universal(tag_dir) is None:
        try:
            keep_universal(tag_dir)
        except CheckpointError as e:
            failure = str(e)
    _raise_on_every_rank(failure)
    return _universal_dir(tag_dir)


def _universal_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(tag_dir.name + "_universal")


def keep_universal(tag_dir: Path) -> Path:
    """Convert the checkpoint into `step_*_universal` beside it, kept for later resumes and exports, with the size
    of each file (sizes.json) and the checkpoint's meta.json, copied last: what kept_universal checks."""
    out = _universal_dir(tag_dir)
    if not os.access(tag_dir.parent, os.W_OK | os.X_OK):  # a read-only mount, an archive of another user's run
        raise CheckpointError(f"{tag_dir}: a resume on another world size or EP size converts it into {out}, but "
                              f"{tag_dir.parent} is not writable: copy the checkpoint into a writable checkpoints/ "
                              "directory and resume from there")
    tmp = tag_dir.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_to_universal(tag_dir, tmp)
    (tag_dir.parent / "latest_universal").unlink(missing_ok=True)  # its pointer names our temp dir
    with _disk_full_named(tmp, tag_dir):
        atomic_write_text(tmp / UNIVERSAL_SIZES, json.dumps(_sizes(tmp)))
        shutil.copytree(tag_dir / "rng", tmp / "rng", dirs_exist_ok=True)
        shutil.copy2(tag_dir / "meta.json", tmp / "meta.json")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


UNIVERSAL_SIZES = "sizes.json"
"""In a kept universal checkpoint: the size of each file the conversion wrote, checked before it is reused."""


def _sizes(universal: Path) -> dict[str, int]:
    return {str(p.relative_to(universal)): p.stat().st_size for p in universal.rglob("*") if p.is_file()}


def kept_universal(tag_dir: Path) -> Path | None:
    """The universal checkpoint kept beside `tag_dir` (keep_universal), if it can be reused: not one whose files were
    truncated or removed since (or made before sizes.json was written), or made from another save of the step (its
    meta.json differs), which DeepSpeed's load failed on deep inside torch.load (a traceback)."""
    universal = _universal_dir(tag_dir)
    try:
        want = json.loads((universal / UNIVERSAL_SIZES).read_text())
        if (universal / "meta.json").read_bytes() != (tag_dir / "meta.json").read_bytes():
            return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    have = _sizes(universal)
    intact = isinstance(want, dict) and all(have.get(name) == size for name, size in want.items())
    return universal if intact else None


def convert_to_universal(tag_dir: Path, out: Path) -> Path:
    """Run DeepSpeed's ds_to_universal on one checkpoint into `out` (one process, no torch.distributed).
    CheckpointError if it fails: a full disk named as such with the space it needs, anything else by the
    conversion's last line of output (its whole output, a DeepSpeed traceback, in a log file named there)."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode == 0 and (out / "zero").is_dir():
        return out
    output = (proc.stderr or proc.stdout).strip()
    shutil.rmtree(out, ignore_errors=True)  # what it wrote before failing is of no use
    with _disk_full_named(out, tag_dir):
        if is_disk_full(output):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with tempfile.NamedTemporaryFile("w", prefix="ds_to_universal-", suffix=".log", delete=False) as log:
        log.write(output + "\n")
    last = output.splitlines()[-1] if output else "no output"
    raise CheckpointError(f"{tag_dir}: DeepSpeed's ds_to_universal failed (exit {proc.returncode}): {last} "
                          f"(its output: {log.name})")


@contextmanager
def _disk_full_named(out: Path, tag_dir: Path):
    """A full disk (or quota) while converting `tag_dir` into `out` becomes a CheckpointError naming both, the free
    space (once the incomplete `out` is removed) and what the conversion needs: roughly twice the checkpoint's size
    (fp32 weights and Adam's two moments, as fragments per partition and merged per parameter; the smoke model's
    95 small files took 2.1 times)."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(out, ignore_errors=True)
        if not is_disk_full(e):
            raise CheckpointError(f"{tag_dir}: converting it to a universal checkpoint in {out}: {e}") from None
        need = sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file())
        raise CheckpointError(f"{tag_dir}: converting it to a universal checkpoint in {out.parent}: {e.strerror} "
                              f"({free_space(out.parent)} there; it needs roughly {size_text(2 * need)}, "
                              "twice the checkpoint's size)") from None


def optimizer_settings(optimizer) -> list[dict]:
    """Each param group's hyperparameters as this run's config set them (but the lr, which the schedule sets): taken
    before a load, for restore_optimizer_settings."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in inner.param_groups]


def restore_optimizer_settings(optimizer, scheduler, settings: list[dict]) -> None:
    """After a load, this config's optimizer settings, not the checkpoint's: DeepSpeed restores the saved param
    groups (betas, eps, weight decay, the scheduler's base lr `initial_lr`) and the scheduler's `base_lrs`, so a
    resume with another train.lr, train.min_lr, train.max_steps, train.weight_decay, ... kept the old values (the
    lr for good, or for one step). A universal load also copies group 0's onto every group, so the no-decay group
    decayed. The schedule's position (`last_epoch`) stays the checkpoint's."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group, saved in zip(inner.param_groups, settings, strict=True):
        group.update(saved)
    scheduler.base_lrs = [g["initial_lr"] for g in inner.param_groups]
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # the token clock sets a step's rate as it begins
        for group, base, factor in zip(inner.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in inner.param_groups]


def repair_universal_load(optimizer) -> None:
    """Undo a DeepSpeed 0.19.8 defect of a universal (resharding) load: every ZeRO-3 sub-group's Adam state shares
    one `step` tensor, which then advances once per sub-group per step: give each its own copy. (Its other, group
    0's hyperparameters copied onto every group, restore_optimizer_settings undoes on every resume.)"""
    inner = getattr(optimizer, "optimizer", optimizer)
    fused = any(g.get("fused") for g in inner.param_groups)  # fused AdamW wants `step` beside the param
    for param, state in inner.state.items():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone().to(param.device if fused else "cpu")
