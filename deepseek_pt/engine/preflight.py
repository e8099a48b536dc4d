"""Everything a training run can be refused for before it starts (the config against the world size, the data,
the checkpoint it resumes, run.dir, init_from's export), each naming the key or path at fault: found by every
rank before the process group forms, and by `python -m deepseek_pt.train --check-only` on a launch host."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..config import (
    Config,
    ConfigError,
    Fp8Config,
    ModelConfig,
    ParallelConfig,
    differences,
    load_config,
    model_from_dict,
    uses_autoep,
)
from ..data.blend import blend_counts
from ..data.dataset import fingerprint
from ..data.format import DataError, Manifest, check_shard
from ..data.loader import data_change
from ..model.counting import meta_model
from . import checkpoint, run_tokenizer
from .accelerator import on_gpu
from .checkpoint import CheckpointError
from .lr_schedule import token_clock_refusal
from .model_states import GiB, describe, expert_and_other_params, model_state_bytes


class PreflightError(ValueError):
    """Bad input found before any process group or run directory is touched."""


def host_memory_available() -> int | None:
    """Bytes of memory the kernel says new allocations can take on this node (MemAvailable), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_memory() -> tuple[str, int] | None:
    """(name, bytes) of the GPU this process will train on, None without one (a CPU run, a launch host)."""
    if not on_gpu():
        return None
    props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return props.name, props.total_memory


def model_states_refusal(cfg: Config, world_size: int, gpu: tuple[str, int],
                         counts: tuple[int, int]) -> str | None:
    """Why the model's states alone cannot fit `gpu`'s memory (gpu_memory's answer) at this world size, or None
    (engine/model_states.py: a lower bound, so a run this passes may still run out of memory on its activations);
    `counts` is expert_and_other_params' answer."""
    name, have = gpu
    need = model_state_bytes(cfg, world_size, counts=counts)
    if sum(need.values()) <= have:
        return None
    stage, ep = cfg.parallel.zero_stage, cfg.parallel.expert_parallel_size
    fixes = []
    if stage < 3:
        at_3 = sum(model_state_bytes(cfg, world_size, stage=3, counts=counts).values())
        fixes.append(f"parallel.zero_stage: 3 partitions weights and gradients too ({at_3 / GiB:,.1f} GiB each here)")
    gpus = world_size
    while sum(model_state_bytes(cfg, gpus, stage=3, counts=counts).values()) > have:
        gpus += ep  # world sizes EP divides
    if gpus > world_size:
        fixes.append(f"at least {gpus} GPUs under ZeRO-3 (before activations)")
    return (f"model states: each of {world_size} GPUs would hold at least {describe(need)} under parallel.zero_stage "
            f"{stage} with parallel.expert_parallel_size {ep}, more than the {have / GiB:,.1f} GiB of its {name}; "
            f"{'; or '.join(fixes)}")


def _assignments(changed: list[tuple[str, object, object]]) -> str:
    return ", ".join(f"{key}={str(v).lower() if isinstance(v, bool) else v}" for key, _, v in changed)


def ignored_fp8_settings(cfg: Config) -> str | None:
    """The fp8 section's keys set other than their defaults at a precision that ignores them, as a line for the
    start's log; None where there are none. Said, not refused: one config run with precision=bf16 and precision=fp8
    overridden is how the two are compared (configs/deepseek-v3-671b.yaml sets fp8.recipe), and a run set up for
    FP8 that trains in bf16 must not do so unawares."""
    if cfg.precision == "fp8" or not (ignored := differences(Fp8Config(), cfg.fp8, "fp8")):
        return None
    return (f"{_assignments(ignored)} ignored: precision is {cfg.precision}, and the fp8 section applies at "
            "precision=fp8 only")


ZERO3_ONLY_KEYS = ("zero_persistence_threshold", "zero_leaf_blocks", "zero_memory_efficient_linear", "zero_fused_step",
                   "zero_keep_params_gathered", "zero_idle_hooks_off")
"""parallel.* keys that only ZeRO stage 3 reads (parallel.zero_init, which builds the model for it, is refused at
another stage)."""


def ignored_zero3_settings(cfg: Config) -> str | None:
    """As ignored_fp8_settings, for the ZeRO-3 keys at another stage (bench-2b's persistence threshold at stage 2)."""
    if cfg.parallel.zero_stage == 3:
        return None
    ignored = [d for d in differences(ParallelConfig(), cfg.parallel, "parallel")
               if d[0].removeprefix("parallel.") in ZERO3_ONLY_KEYS]
    return (f"{_assignments(ignored)} ignored: parallel.zero_stage is {cfg.parallel.zero_stage}, and these apply to "
            "ZeRO-3 only") if ignored else None


# cuBLAS's workspace settings under which its GEMMs repeat to the bit (the cuBLAS guide's "Results reproducibility")
DETERMINISTIC_CUBLAS_WORKSPACES = (":4096:8", ":16:8")


def preflight(cfg: Config, world_size: int) -> None:
    """Everything that can be refused before starting: names the key or path at fault."""
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if cfg.train.deterministic and workspace not in (None, *DETERMINISTIC_CUBLAS_WORKSPACES):
        raise PreflightError(f"train.deterministic: CUBLAS_WORKSPACE_CONFIG={workspace!r} in the environment; cuBLAS "
                             f"repeats its sums only under {' or '.join(DETERMINISTIC_CUBLAS_WORKSPACES)} (or leave it "
                             "unset: training then sets the first)")
    if cfg.train.lr_schedule_unit == "tokens" and (refusal := token_clock_refusal(cfg, world_size)):
        raise PreflightError(refusal)
    has_moe = cfg.model.moe.n_dense_layers < cfg.model.n_layers
    ep = cfg.parallel.expert_parallel_size
    if has_moe and world_size % ep:
        raise PreflightError(f"parallel.expert_parallel_size: {ep} does not divide the world size ({world_size} processes)")
    if has_moe:  # AutoEP's torch._grouped_mm (CPU and GPU) takes only operands whose rows are 16-byte aligned; here,
        # not in validate: generation and conversion run the model's own MoE, which takes any width
        align = 16 // (4 if cfg.precision == "fp32" else 2)
        for key, v in (("model.dim", cfg.model.dim), ("model.moe.expert_inter_dim", cfg.model.moe.expert_inter_dim)):
            if v % align:
                raise PreflightError(f"{key}: {v} is not a multiple of {align}, which the routed experts' grouped GEMMs "
                                     f"need at precision {cfg.precision} (rows of a multiple of 16 bytes)")
    if cfg.precision == "fp8":
        from .fp8 import (
            BLOCK,
            blockwise_gemms_unavailable,
            expert_gemms_unavailable,
            fp8_unavailable,
        )
        if why := fp8_unavailable(cfg.fp8.recipe):
            raise PreflightError(f"precision: fp8 with fp8.recipe={cfg.fp8.recipe} {why}: use precision=bf16 or "
                                 "fp32, or fp8.recipe=blockwise (emulated)")
        for key, on, gemms in (("fp8.experts", cfg.fp8.experts, "FP8 grouped GEMMs"),
                               ("fp8.shared_experts", cfg.fp8.shared_experts, "FP8 grouped GEMMs"),
                               ("fp8.attention", cfg.fp8.attention, "rowwise FP8 GEMMs"),
                               ("fp8.dense_mlp", cfg.fp8.dense_mlp, "rowwise FP8 GEMMs")):
            if on and on_gpu() and (why := expert_gemms_unavailable()):
                raise PreflightError(f"{key}: {gemms} {why}: set {key}=false (only a CPU emulates them)")
        tokens = cfg.data.seq_len * cfg.train.micro_batch_size
        if cfg.fp8.recipe == "blockwise" and tokens % BLOCK and not blockwise_gemms_unavailable():
            raise PreflightError(
                f"data.seq_len x train.micro_batch_size: {cfg.data.seq_len} x {cfg.train.micro_batch_size} = {tokens} "
                f"tokens per micro-step; fp8.recipe=blockwise's FP8 GEMMs scale the weight gradient in tiles of "
                f"{BLOCK} tokens, so it must be a multiple of {BLOCK}")
    gpu = gpu_memory()
    # One shape-only build for both memory checks (seconds at DeepSeek-V3's shape), and none where neither runs
    counts = expert_and_other_params(cfg) if gpu or not cfg.parallel.zero_init else None
    if gpu and (refusal := model_states_refusal(cfg, world_size, gpu, counts)):
        raise PreflightError(refusal)
    if not cfg.parallel.zero_init:  # each process builds the whole model in fp32 before DeepSpeed partitions it
        n_params = sum(counts)
        procs = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world_size)
        need, available = 4 * n_params * procs, host_memory_available()
        if available is not None and need > available:
            fix = ("set parallel.zero_init=true (the model is then built partitioned)" if cfg.parallel.zero_stage == 3
                   else "use parallel.zero_stage=3 with parallel.zero_init=true")
            raise PreflightError(
                f"parallel.zero_init: false builds the whole model in fp32 in each of this node's {procs} processes: "
                f"{need / 2**30:,.1f} GiB ({n_params:,} parameters x 4 bytes x {procs}), more than the "
                f"{available / 2**30:,.1f} GiB of memory available here; {fix}")
    manifests = check_data(cfg)
    data = manifests[0]
    if cfg.train.init_from:
        from ..export import ExportError, read_export_info, trained_tokenizer_sha256
        try:
            info = read_export_info(cfg.train.init_from)
            exported = load_config(Path(cfg.train.init_from) / "config.yaml", saved=True)
        except (ExportError, ConfigError) as e:
            raise PreflightError(f"train.init_from: {e}") from None
        trained_with = trained_tokenizer_sha256(cfg.train.init_from, info)
        if trained_with is not None and trained_with != data.tokenizer_sha256:
            raise PreflightError(
                f"train.init_from: {cfg.train.init_from} was trained with another tokenizer (sha256 "
                f"{trained_with[:12]}...) than {cfg.data.source_key(0)} {data.path} was tokenized with (sha256 "
                f"{data.tokenizer_sha256[:12]}...): its embeddings would read ids that name other pieces; train on "
                "data of its tokenizer")
        if parameter_shapes(exported.model) != parameter_shapes(cfg.model):  # keys that shape none may change
            differ = differences(exported.model, cfg.model, "model")  # named: a model section has dozens of keys
            raise PreflightError(f"train.init_from: the parameter shapes of {cfg.train.init_from}/config.yaml's model "
                                 "differ from this config's: " + "; ".join(f"{key}: {here!r} here, {theirs!r} in the "
                                                                           "export" for key, theirs, here in differ)
                                 + "; train with that model section (keys that shape no parameter, such as "
                                 "model.max_seq_len and model.attention.rope for a longer context, may change)")
    run_dir = Path(cfg.run.dir)  # train() creates it and writes config.yaml there first thing
    made = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not made.is_dir():
        raise PreflightError(f"run.dir: {run_dir}: {made} is not a directory")
    if not os.access(made, os.W_OK | os.X_OK):
        raise PreflightError(f"run.dir: {run_dir}: {made} is not writable")
    # What the run writes there: a directory where a file goes failed with an IsADirectoryError traceback, and a
    # file named checkpoints only at the first save, the steps before it lost
    for name, is_dir in (("config.yaml", False), ("metrics.jsonl", False), (".lock", False),
                         (run_tokenizer.COPY_NAME, False), (run_tokenizer.RECORD_NAME, False), ("checkpoints", True)):
        if (run_dir / name).exists() and (run_dir / name).is_dir() != is_dir:
            raise PreflightError(f"run.dir: {run_dir / name} is {'not ' * is_dir}a directory, where the run writes its "
                                 f"{name}: remove it, or use another run.dir")
    try:
        resume_dir = checkpoint.resolve(cfg.train.resume, run_dir)
    except CheckpointError as e:
        raise PreflightError(str(e)) from None
    root = checkpoint.checkpoints_dir(run_dir)
    if resume_dir is not None:
        try:
            meta = checkpoint.read_meta(resume_dir)
        except CheckpointError as e:
            raise PreflightError(str(e)) from None
        if why := resume_mismatch(meta, cfg, str(resume_dir / "meta.json")):
            raise PreflightError(f"train.resume: this config cannot resume {resume_dir}: {why}. Resume with the "
                                 "checkpoint's settings, or start a new run from its weights (python -m "
                                 "deepseek_pt.engine.export, then train.init_from)")
        if why := new_data_refusal(meta, cfg, manifests):
            raise PreflightError(f"train.resume: {resume_dir}: {why}")
        if meta["step"] > cfg.train.max_steps:  # equal is a finished run started again: it exits 0 without a step
            # Past it, the run trained nothing and said "train.max_steps reached": an extension mistyped looked done.
            raise PreflightError(f"train.max_steps: {cfg.train.max_steps} is below the step of the checkpoint it "
                                 f"resumes ({meta['step']}, {resume_dir}): nothing to train; raise it to go on")
    complete = checkpoint.complete_checkpoints(root)
    found = complete if cfg.train.checkpoints else []
    if resume_dir is None and found:
        # A fresh run's saves would replace those of the same steps and be pruned in favour of higher ones.
        raise PreflightError(f"train.resume: {cfg.train.resume} starts from step 0, but {root} holds complete "
                             f"checkpoints (newest {found[-1].name}) that this run's saves would overwrite "
                             "or prune: use another run.dir, give train.resume a checkpoint's path, or remove them")
    if resume_dir is not None and found and resume_dir.parent.resolve() == root.resolve() \
            and found[-1].name > resume_dir.name:
        # A rollback in place: `latest` would name the abandoned later history until this run's saves replace it
        # step by step (a crash before then resumes that history), and each save deletes its namesake first.
        raise PreflightError(f"train.resume: {resume_dir.name} is older than {found[-1].name} in the same "
                             f"run.dir ({root}): resume it into another run.dir (run.dir=NEW "
                             f"train.resume={resume_dir}), or remove the later checkpoints")
    # Each start records the data's tokenizer in run.dir (engine/run_tokenizer.py): that must stay true of the
    # checkpoints it goes with, those resumed and those already there.
    trained = {resume_dir.parent.parent} if resume_dir is not None else set()
    if complete:
        trained.add(run_dir)
    for where in trained:
        try:
            recorded = run_tokenizer.read(where)
        except CheckpointError as e:
            raise PreflightError(str(e)) from None
        if recorded is not None and recorded.sha256 != data.tokenizer_sha256:
            raise PreflightError(
                f"{cfg.data.source_key(0)}: {data.path} was tokenized with another tokenizer (sha256 "
                f"{data.tokenizer_sha256[:12]}...) than the checkpoints in {where} were trained with "
                f"({where / run_tokenizer.RECORD_NAME}: sha256 {recorded.sha256[:12]}...): its ids would name other "
                "pieces; train on data of that tokenizer, or in another run.dir")


def check_data(cfg: Config) -> list[Manifest]:
    """Every source of training data opens, fits the model's vocabulary, shares one tokenizer, and holds a training
    sample and (when evaluating) a validation sample: found here, not at the first evaluation hours in. Returns the
    sources' manifests, in order."""
    from ..data import open_manifest

    sources = cfg.data.sources()
    if not sources:
        raise PreflightError("data.path: required to train: a shard directory (or the sources of data.blend)")
    manifests: list[Manifest] = []
    for j, source in enumerate(sources):
        key = cfg.data.source_key(j)
        try:
            manifest = open_manifest(source.path)
            if j == 0:  # the copy each start keeps in run.dir (a blend's sources share its tokenizer: below)
                run_tokenizer.data_tokenizer(manifest)
        except DataError as e:
            raise PreflightError(f"{key}: {e}") from None
        if manifest.vocab_size > cfg.model.vocab_size:
            raise PreflightError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                                 f"({manifest.vocab_size}, from {manifest.path})")
        if manifests and manifest.tokenizer_sha256 != (first := manifests[0]).tokenizer_sha256:
            raise PreflightError(f"{key}: {manifest.path} was tokenized with another tokenizer (sha256 "
                                 f"{manifest.tokenizer_sha256[:12]}) than {first.path} ({first.tokenizer_sha256[:12]}): "
                                 "a blend's sources must share one")
        for split_key, split, need in (("data.train_split", cfg.data.train_split, True),
                                       ("data.val_split", cfg.data.val_split, cfg.train.eval_every > 0)):
            if not need:
                continue
            if split not in manifest.splits:
                raise PreflightError(f"{split_key}: split {split!r} not in {manifest.path} (has: {sorted(manifest.splits)})")
            if not manifest.shards(split):  # a manifest lists train and val always, val empty by default
                why = (" (build_shards.py --val-fraction puts documents there, 0 by default): set train.eval_every=0 "
                       "to train without evaluation" if split_key == "data.val_split" else "")
                raise PreflightError(f"{split_key}: split {split!r} of {manifest.path} is empty{why}")
            for shard in manifest.shards(split):  # sizes, a stat each: the loader finds them after run.dir is written
                try:
                    check_shard(manifest, shard)
                except DataError as e:
                    raise PreflightError(f"{key}: {e}") from None
            if manifest.num_samples(split, cfg.data.seq_len) == 0:
                raise PreflightError(f"{split_key}: split {split!r} of {manifest.path} holds no sample of "
                                     f"data.seq_len + 1 = {cfg.data.seq_len + 1} tokens")
        manifests.append(manifest)
    return manifests


NEW_DATA_HINT = "; set data.resume_on_new_data=true to go on with this data"
"""Ends the refusal of a resume on other training data: here from meta.json, in train.py from the loader's state."""


def new_data_refusal(meta: dict, cfg: Config, manifests: list[Manifest]) -> str | None:
    """Why the checkpoint of `meta` was trained on other data than the sources of `manifests` (other sources, shards
    or blend weights) if data.resume_on_new_data does not allow it, or None: refused here, before DeepSpeed loads
    it. Checkpoints whose meta.json does not record the loader's state are refused by TrainLoader after the load."""
    state = (meta.get("settings") or {}).get("loader")
    if state is None or cfg.data.resume_on_new_data:
        return None
    split = cfg.data.train_split
    where = ", ".join(f"{m.path} split {split!r}" for m in manifests)  # as TrainLoader names its datasets
    try:
        why = data_change(state, [fingerprint(m, split) for m in manifests],
                          blend_counts([s.weight for s in cfg.data.sources()]), where)
    except DataError as e:
        return str(e)
    return why and why + NEW_DATA_HINT


def resume_settings(cfg: Config) -> dict:
    """What a checkpoint records of its run for resume_mismatch (meta.json's `settings`; train.py adds the loader's
    state, `loader`, for new_data_refusal)."""
    return {"model": dataclasses.asdict(cfg.model), "zero_stage": cfg.parallel.zero_stage,
            "bf16": cfg.precision != "fp32", "autoep": uses_autoep(cfg), "seq_len": cfg.data.seq_len,
            "data_seed": cfg.data.seed}


def _saved_with_autoep(saved: dict) -> bool:
    """Whether a checkpoint's routed experts are in AutoEP's layout. Checkpoints from before `settings` recorded it
    went through AutoEP unless the model had no MoE layer, or a sequence-wise balance loss (our own block then)."""
    if "autoep" in saved:
        return saved["autoep"]
    moe = saved["model"]["moe"]
    return moe["n_dense_layers"] < saved["model"]["n_layers"] and not moe.get("seq_aux_loss_alpha")


def parameter_shapes(model: ModelConfig) -> dict[str, tuple]:
    """Each parameter's shape in a model of this section: what weights saved from another must match to load."""
    return {n: tuple(p.shape) for n, p in meta_model(model).named_parameters()}


def resume_mismatch(meta: dict, cfg: Config, where: str) -> str | None:
    """Why this config cannot load the checkpoint of `meta` (DeepSpeed fails deep inside its load instead), or None.
    Checkpoints older than meta.json's `settings` are not checked."""
    saved = meta.get("settings")
    if not saved:
        return None
    if saved["zero_stage"] != cfg.parallel.zero_stage:
        return (f"parallel.zero_stage: {cfg.parallel.zero_stage} here, {saved['zero_stage']} in the checkpoint "
                "(its partitions are laid out for that stage)")
    if saved["bf16"] != (cfg.precision != "fp32"):
        return (f"precision: {cfg.precision} here, {'bf16 or fp8' if saved['bf16'] else 'fp32'} in the checkpoint "
                "(DeepSpeed keeps other optimizer files for bf16 training)")
    for key, name, here in (("seq_len", "data.seq_len", cfg.data.seq_len), ("data_seed", "data.seed", cfg.data.seed)):
        if key in saved and saved[key] != here:  # not recorded before: the loader's state refuses it, later
            return f"{name}: {here} here, {saved[key]} in the checkpoint (every source's sample order would change)"
    try:
        model: ModelConfig = model_from_dict(saved["model"], where)
    except ConfigError as e:
        return f"its model section does not load ({e})"
    if parameter_shapes(model) != parameter_shapes(cfg.model):  # keys that shape none (rope, routing) may change
        differ = differences(model, cfg.model, "model")
        return "the model's parameter shapes differ: " + "; ".join(
            f"{key}: {here!r} here, {saved!r} in the checkpoint" for key, saved, here in differ)
    if _saved_with_autoep(saved) != uses_autoep(cfg):
        return ("its routed experts are in deepseek_pt's own MoE block's layout (saved by a version that trained a "
                "model with model.moe.seq_aux_loss_alpha outside DeepSpeed AutoEP), which this version trains "
                "in AutoEP")
    return None
