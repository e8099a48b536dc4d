import json
import re
from pathlib import Path

import pytest
import yaml

from deepseek_pt.config import ConfigError, load_config
from deepseek_pt.params import main as params_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ASSETS = Path(__file__).resolve().parent / "assets"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load_and_pass_preflight(name, tmp_path, monkeypatch):
    """Each shipped config loads, and the launch checks accept it at a world size its expert parallelism fits: only
    its data (the committed test shards, short sequences) and run directory replaced, host memory not counted."""
    import deepseek_pt.engine.preflight as preflight_checks

    cfg = load_config(CONFIGS / name, [f"data.path={ASSETS / 'smoke_shards'}", "data.seq_len=32",
                                       "train.eval_every=0", f"run.dir={tmp_path / 'run'}"])
    monkeypatch.setattr(preflight_checks, "host_memory_available", lambda: None)
    monkeypatch.setattr(preflight_checks, "gpu_memory", lambda: None)  # 671B's states need more GPUs than its EP
    preflight_checks.preflight(cfg, world_size=cfg.parallel.expert_parallel_size)


def _write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data, overrides, message", [
    ({"model": {"moe": {"topk": 2}}}, [], "model.moe.topk: unknown key, did you mean model.moe.top_k? (allowed: "),
    ({"train": {"zero_stage": 2}}, [], "train.zero_stage: unknown key, did you mean parallel.zero_stage? (allowed: "),
    ({}, ["model.attention.theta=1"], "model.attention.theta: unknown key, did you mean model.attention.rope.theta?"),
    ({"model": {"dim": "wide"}}, [], "model.dim: expected int, got 'wide'"),
    ({"model": {"moe": {"top_k": 9, "n_routed_experts": 8}}}, [], "model.moe.top_k: 9 > model.moe.n_routed_experts (8)"),
    ({"model": {"moe": {"n_routed_experts": 8, "n_expert_groups": 3}}}, [], "model.moe.n_expert_groups: 3 groups do not divide"),
    ({"model": {"attention": {"use_output_subspace": True}}}, [], "model.attention.o_latent_dim: required"),
    ({"train": {"compile_blocks": True}, "parallel": {"zero_leaf_blocks": False}}, [],
     "train.compile_blocks: under ZeRO-3 needs parallel.zero_leaf_blocks: true"),
    ({"parallel": {"coalesce_grad_reduction": True, "zero_stage": 0}, "precision": "fp32"}, [],
     "parallel.coalesce_grad_reduction: needs parallel.zero_stage 1, 2 or 3"),
    ({"parallel": {"zero_stage": 0}, "precision": "bf16"}, [],
     "parallel.zero_stage: 0 (no ZeRO) runs only with precision: fp32 (got bf16): DeepSpeed 0.19.8 runs bf16 without "
     "ZeRO through its FP16_UnfusedOptimizer"),
    ({"model": {"attention": {"use_output_subspace": True, "o_latent_dim": 0}}}, [], "model.attention.o_latent_dim: must be positive"),
    # MLA-o's latent as wide as o_proj's input or wider: no saving, more parameters
    ({"model": {"attention": {"use_output_subspace": True, "o_latent_dim": 2048}}}, [],
     ("model.attention.o_latent_dim: 2048 >= model.attention.n_heads x v_head_dim (16 x 128 = 2048): o_a_proj -> "
      "o_b_proj at least as wide as the attention output that o_proj projects saves nothing over o_proj")),
    ({"model": {"attention": {"n_heads": 2, "v_head_dim": 64}}},
     ["model.attention.use_output_subspace=true", "model.attention.o_latent_dim=4096"],
     ("(override model.attention.o_latent_dim=4096): model.attention.o_latent_dim: 4096 >= model.attention.n_heads x "
      "v_head_dim (2 x 64 = 128)")),
    ({"precision": "fp16"}, [], "precision: 'fp16' is not one of 'fp32' | 'bf16' | 'fp8'"),
    ({"parallel": {"zero_init": True, "zero_stage": 2}}, [], "parallel.zero_init: needs parallel.zero_stage: 3 (got 2)"),
    ({"parallel": {"zero_init": True}, "model": {"tie_embeddings": True}}, [],
     "parallel.zero_init: cannot build a model whose head shares the embedding"),
    ({"train": {"exit_at_step": 20, "max_steps": 10, "warmup_steps": 5}}, [],
     "train.exit_at_step: must be in [1, train.max_steps=10]"),
    ({}, ["model.attention.use_output_subspace=true"], "model.attention.o_latent_dim: required"),
    ({}, ["model.attention.o_latent_dim=256"], ("model.attention.o_latent_dim: 256 is set, but "
                                                "model.attention.use_output_subspace is false: set that true for "
                                                "MLA-o, or this null")),
    ({}, ["parallel.expert_parallel_size=5"], ("c.yaml (override parallel.expert_parallel_size=5): "
                                               "parallel.expert_parallel_size: 5 does not divide")),
    ({}, ["train.seed=99999999999999999999999"], "train.seed: 99999999999999999999999 does not fit in 64 bits"),
    ({}, [f"train.seed={-2**63 - 1}"], f"train.seed: {-2**63 - 1} does not fit in 64 bits"),
    ({}, [f"train.grad_accum_steps={2**63}"], f"train.grad_accum_steps: {2**63} does not fit in 64 bits"),
    ({}, [f"train.activation_checkpointing=[0, {2**64}]"], "train.activation_checkpointing: expected bool | list of int"),
    ({}, ["parallel.zero_stage=3.0"], "parallel.zero_stage: 3.0 is not one of 0 | 1 | 2 | 3"),
    ({}, ["parallel.zero_stage=true"], "parallel.zero_stage: True is not one of 0 | 1 | 2 | 3"),
    ({}, ["model.moe.bogus=1"], "model.moe.bogus: unknown key (allowed: "),
    ({}, ["train.save_every=2", "train.keep_every=5"],
     "train.keep_every: 5 is not a multiple of train.save_every (2): no checkpoint would be saved at those steps"),
    ({}, ["train.keep_every=4"], "train.keep_every: 4 is not a multiple of train.save_every (0)"),
    ({}, ["train.checkpoints=false", "train.keep_every=4"],
     "train.keep_every: 4 keeps checkpoints, but train.checkpoints is false"),
    ({}, ["train.keep_every=-2"], "train.keep_every: must be >= 0, got -2"),
    ({}, ["train.batch_rampup_tokens=1000", "train.grad_accum_steps=4", "train.batch_rampup_start=4"],
     ("train.batch_rampup_start: must be at least 1 and below train.grad_accum_steps (4), the micro-steps the ramp "
      "rises to, got 4")),
    ({}, ["train.batch_rampup_tokens=1000", "train.grad_accum_steps=4", "train.batch_rampup_start=0"],
     "train.batch_rampup_start: must be at least 1 and below train.grad_accum_steps (4)"),
    ({}, ["train.batch_rampup_tokens=-1"], "train.batch_rampup_tokens: must be >= 0, got -1"),
    ({}, ["train.max_steps=10", "train.profile_start_step=9", "train.profile_steps=3"],
     ("train.profile_start_step: traces steps 9-11 (train.profile_steps 3), past train.max_steps 10: the trace would "
      "never be written")),
    ({}, ["train.profile_start_step=-1"], "train.profile_start_step: must be >= 0, got -1"),
    ({}, ["train.profile_steps=0"], "train.profile_steps: must be positive, got 0"),
    ({}, ["train.batch_rampup_tokens=4.69e11"], "train.batch_rampup_tokens: expected int"),
    ({"train": {"eval_batches": 8}}, [], "train.eval_batches: replaced by train.eval_sequences, the count of sequences "
                                         "over all processes (the old key counted micro-batches per process"),
    ({}, ["model.dim"], "expected key.path=value"),
    ({"model": 3}, [], "model: expected a mapping"),
    ({}, ["model.moe.n_dense_layers=-1"], "model.moe.n_dense_layers: must be >= 0, got -1"),
    ({"data": {"seq_len": 64}}, ["model.mtp_depth=64"], "model.mtp_depth: 64 >= data.seq_len (64): depth k predicts"),
    ({"data": {"val_split": "train"}, "train": {"eval_every": 10}}, [],
     "data.val_split: 'train' is data.train_split too: the held-out loss would be measured on samples the run trains"),
    ({}, ["train.activation_checkpointing=[0, 7]"], "train.activation_checkpointing: block 7 is not in 0 .. "),
    ({}, ["train.activation_checkpointing=[1, 1]"], "train.activation_checkpointing: a block is listed twice"),
    ({}, ["train.activation_checkpointing=[1, x]"], "train.activation_checkpointing: expected bool | list of int"),
    ({"data": {"path": "a", "blend": [{"path": "b"}]}}, [],
     "data.path: 'a' is set and data.blend lists 1 source: set data.path: null to train on the blend"),
    ({"data": {"blend": [{"path": "x/web"}, {"path": "y/web"}]}}, [],
     "data.blend[1].name: 'web' is data.blend[0]'s too: give each source its own name"),
    ({"data": {"blend": [{"path": "a"}, {"path": "b", "weight": 0}]}}, [],
     "data.blend[1].weight: weight must be positive and finite, got 0.0"),
    ({"data": {"blend": [{"path": "a", "weight": 1e7}, {"path": "b", "weight": 1}]}}, [],
     "data.blend[1].weight: weight 1.0 is below 1/65536 of the total"),
    ({"data": {"blend": [{"path": "a", "name": "web text"}]}}, [], "data.blend[0].name: 'web text' names a metric"),
    ({"data": {"blend": [{"weight": 1}]}}, [], "data.blend[0].path: required"),
    ({"data": {"blend": [{"path": "a", "wieght": 1}]}}, [], "data.blend[0].wieght: unknown key, did you mean data.blend[0].weight?"),
    ({"data": {"blend": {"path": "a"}}}, [], "data.blend: expected list of DataSource"),
    ({}, ["train.lr=.inf"], "train.lr: must be a finite number, got inf"),
    ({}, [f"train.lr={10**400}"], f"train.lr: must be a finite number, got {10**400}"),  # YAML's int, past any float
    ({"train": {"min_lr": 10**309}}, [], f"train.min_lr: must be a finite number, got {10**309}"),
    ({"model": {"init_std": "nan"}}, [], "model.init_std: must be a finite number, got nan"),
    ({}, ["model.moe.route_scale=-1"], "model.moe.route_scale: must be positive, got -1.0"),
    # The bounds themselves: route_scale 0 silences the routed experts; beta 1 makes Adam's bias correction 1 - 1^t = 0
    ({}, ["model.moe.route_scale=0"], "model.moe.route_scale: must be positive, got 0.0"),
    ({}, ["train.beta1=1"], "train.beta1: must be in [0, 1), got 1.0"),
    ({}, ["train.beta2=1"], "train.beta2: must be in [0, 1), got 1.0"),
    ({}, ["train.peak_tflops=-1"], "train.peak_tflops: must be positive, got -1.0"),
    ({}, ["parallel.timeout_minutes=1e30"], "parallel.timeout_minutes: must be in (0, 525600] (a year), got 1e+30"),
    ({}, ["parallel.heartbeat_timeout_minutes=0.1"],
     ("parallel.heartbeat_timeout_minutes: must be in [0.5, 525600] (30 s: six of the watch's polls, up to a year), "
      "or null for none; got 0.1")),
    ({"model": {"attention": {"rope": {"scaling": "yarn", "factor": 4, "beta_slow": 0}}}}, [],
     "model.attention.rope.beta_slow: must be positive for yarn, got 0.0"),
    ({"model": {"attention": {"rope": {"scaling": "yarn", "factor": 4, "beta_fast": -1, "beta_slow": -2}}}}, [],
     "model.attention.rope.beta_slow: must be positive for yarn, got -2.0"),
    ({"model": {"attention": {"rope": {"scaling": "yarn", "factor": 4, "theta": 1}}}}, [],
     "model.attention.rope.theta: must exceed 1 for yarn, got 1.0"),
    ({"model": {"attention": {"rope": {"scaling": "yarn", "factor": 4, "mscale_all_dim": -1}}}}, [],
     "model.attention.rope.mscale_all_dim: must be >= 0 for yarn, got -1.0"),
    ({}, ['run.dir=""'], "run.dir: '' is empty: name the run directory"),
    ({"run": {"dir": " "}}, [], "run.dir: ' ' is empty: name the run directory"),
    ({}, ["parallel.zero_persistence_threshold=-5"], "parallel.zero_persistence_threshold: must be >= 0, got -5"),
    ({"train": {"schedule": "wsd", "max_steps": 10, "warmup_steps": 9, "wsd_decay_fraction": 0.2}}, [],
     "train.warmup_steps: 9 runs into schedule wsd's decay, which starts after step 8"),
    # A warmup longer than the run: blamed on the key an override set
    ({"train": {"warmup_steps": 20, "max_steps": 10}}, [],
     ("c.yaml: train.warmup_steps: 20 > train.max_steps (10): the learning rate would end the run at 0.00015, never "
      "reaching train.lr (0.0003); set train.warmup_steps to at most 10, or train.max_steps to at least 20")),
    ({}, ["train.max_steps=50"],
     "c.yaml (override train.max_steps=50): train.max_steps: 50 < train.warmup_steps (100)"),
    ({"train": {"max_steps": 50}}, ["train.warmup_steps=60"],
     "c.yaml (override train.warmup_steps=60): train.warmup_steps: 60 > train.max_steps (50)"),
    ({}, ["train.max_steps=50", "train.schedule=constant"], "train.max_steps: 50 < train.warmup_steps (100)"),
    # Sizes that build a module per block or expert: refused here, where preflight's count hung on them
    ({}, ["model.n_layers=100000000000"], ("model.n_layers: must be at most 1024 (each block is a module of its own, "
                                           "built one at a time), got 100000000000")),
    ({}, ["model.mtp_depth=1025"], "model.mtp_depth: must be at most 1024"),
    ({}, ["model.moe.n_routed_experts=100000000000"], ("model.moe.n_routed_experts: 100000000000 in each of 3 MoE "
                                                       "blocks (model.n_layers - model.moe.n_dense_layers + "
                                                       "model.mtp_depth) make 300,000,000,000 routed experts, more "
                                                       "than 131,072")),
    ({"model": {"n_layers": 600, "moe": {"n_routed_experts": 256}}}, [], "make 153,344 routed experts, more than"),
])
def test_errors_name_the_file_and_key(tmp_path, data, overrides, message):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)
    if "key.path=value" not in message:
        assert str(path) in str(err.value)


def test_model_sizes_at_their_ceilings_load(tmp_path):
    """The bounds on blocks and routed experts leave room far beyond published shapes (DeepSeek-V3: 61 layers,
    256 x 59 routed experts); with no MoE layer, the expert count builds nothing and is not bounded."""
    cfg = load_config(_write(tmp_path, {}), ["model.n_layers=1024", "model.moe.n_dense_layers=1",
                                             "model.moe.n_routed_experts=128"])  # 1023 x 128 = 130,944
    assert cfg.model.n_layers == 1024
    assert load_config(_write(tmp_path, {}), ["model.moe.n_dense_layers=4", "model.moe.n_routed_experts=1000000"])


def test_a_warmup_as_long_as_the_run_loads(tmp_path):
    """warmup_steps == max_steps (a learning-rate range test: the rate rises the whole run) reaches train.lr."""
    assert load_config(_write(tmp_path, {"train": {"warmup_steps": 50, "max_steps": 50}})).train.warmup_steps == 50


@pytest.mark.parametrize("override", ["run.name=@run", "data.path=*shards", "model.dim={"])
def test_an_override_that_is_not_yaml_is_named(tmp_path, override):
    with pytest.raises(ConfigError, match=f"override '{re.escape(override)}': the value is not valid YAML"):
        load_config(_write(tmp_path, {}), [override])
    name = load_config(_write(tmp_path, {}), ['run.name="@run"']).run.name  # what the message tells to do
    assert name == "@run"


def test_a_config_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\x80\x02PK\xff")  # e.g. a checkpoint's .pt given as --config
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: cannot read the config file"):
        load_config(path)


def test_a_config_or_override_nested_too_deeply_is_named(tmp_path):
    """Thousands of nested lists (or a few hundred) were a RecursionError from inside PyYAML's parser or from
    copy.deepcopy; a hundred and one levels parsed, but nest deeper than any config."""
    path = tmp_path / "c.yaml"
    for levels in (5000, 300, 101):
        path.write_text("model:\n  dim: " + "[" * levels + "]" * levels + "\n")
        with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: nested too deeply: lists or mappings more "
                                              "than 100 levels inside each other$"):
            load_config(path)
        with pytest.raises(ConfigError, match=r"^override model\.dim=\.\.\.: the value is nested too deeply: lists or "
                                              "mappings more than 100 levels"):
            load_config(_write(tmp_path, {}), ["model.dim=" + "[" * levels + "]" * levels])


def test_overrides_are_typed_and_applied(tmp_path):
    cfg = load_config(_write(tmp_path, {}), ["model.attention.use_output_subspace=true",
                                             "model.attention.o_latent_dim=256", "train.lr=1e-3", "run.dir=/tmp/x"])
    assert cfg.model.attention.use_output_subspace and cfg.model.attention.o_latent_dim == 256
    assert cfg.train.lr == 1e-3 and cfg.run.dir == "/tmp/x"
    assert load_config(_write(tmp_path, {}), ["train.activation_checkpointing=[1]"]).train.activation_checkpointing == [1]
    assert load_config(_write(tmp_path, {}), ["train.activation_checkpointing=true"]).train.activation_checkpointing is True



def test_a_bad_override_is_blamed_on_the_override_not_the_file(tmp_path):
    path = _write(tmp_path, {"model": {"dim": 64}})
    with pytest.raises(ConfigError, match=r"c.yaml \(override model.dim='abc'\): model.dim: expected int, got 'abc'"):
        load_config(path, ["train.lr=1e-3", "model.dim=abc"])
    with pytest.raises(ConfigError, match=r"c.yaml: model.n_layers: expected int"):
        load_config(_write(tmp_path, {"model": {"n_layers": "four"}}), ["model.dim=abc"])  # the file's comes first


@pytest.mark.parametrize("overrides, message", [
    (["data.path=null", "data.blend=[{path: /d/a, weight: 1}, {path: /d/a, weight: 2}]"],
     "c.yaml (override data.blend=[{'path': '/d/a', 'weight': 1}, {'path': '/d/a', 'weight': 2}]): "
     "data.blend[1].name: 'a' is data.blend[0]'s too"),
    (["data.path=null", "data.blend=[{path: /d/a, weight: 0.000001}, {path: /d/b, weight: 1}]"],
     "(override data.blend=[{'path': '/d/a', 'weight': 1e-06}, {'path': '/d/b', 'weight': 1}]): data.blend[0].weight"),
    (["model.attention={n_heads: 4, qk_rope_head_dim: 7}"],
     "(override model.attention={'n_heads': 4, 'qk_rope_head_dim': 7}): model.attention.qk_rope_head_dim"),
    (["model.attention.qk_rope_head_dim=8", "model.attention={qk_rope_head_dim: 7}"],
     "(override model.attention={'qk_rope_head_dim': 7}): model.attention.qk_rope_head_dim: must be even"),
])
def test_a_bad_value_inside_an_overridden_section_is_blamed_on_that_override(tmp_path, overrides, message):
    """A blend (or section) given on the command line was blamed on the file, which never held it."""
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, {"data": {"path": "/d/one"}}), overrides)
    assert message in str(err.value)


def test_a_key_given_twice_in_the_file_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 64\ntrain:\n  lr: 1.0e-3\nmodel:\n  n_layers: 2\n")
    with pytest.raises(ConfigError, match=r"(?s)c.yaml: not valid YAML: key 'model' appears twice.*line 5"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'model=\{dim: 64, dim: 32\}': the value is not valid YAML \(key "
                                          r"'dim' appears twice\)$"):
        load_config(_write(tmp_path, {}), ["model={dim: 64, dim: 32}"])


@pytest.mark.parametrize("text", ["model:\n  ? [dim, n_layers]\n  : 64\n", "train: {}\n{dim: 64}: 1\n"])
def test_a_key_that_is_a_list_or_mapping_is_named(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"(?s)c.yaml: not valid YAML: while constructing a "
                                          r"mapping.*found unhashable key.*line 2"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'model=\{\[1\]: 2\}': the value is not valid YAML \(found "
                                          r"unhashable key\)"):
        load_config(_write(tmp_path, {}), ["model={[1]: 2}"])


def test_a_blend_from_yaml_or_an_override(tmp_path):
    blend = [{"path": "/d/web", "weight": 0.7}, {"path": "/d/code", "weight": 0.3, "name": "code-v2"}]
    cfg = load_config(_write(tmp_path, {"data": {"blend": blend}}))
    assert [(s.path, s.weight, s.label) for s in cfg.data.sources()] == [("/d/web", 0.7, "web"), ("/d/code", 0.3, "code-v2")]
    assert [cfg.data.source_key(j) for j in range(2)] == ["data.blend[0].path", "data.blend[1].path"]
    over = load_config(_write(tmp_path, {"data": {"path": "/d/one"}}),
                       ["data.path=null", "data.blend=[{path: /d/web, weight: 0.7}, {path: /d/code, weight: 0.3, name: code-v2}]"])
    assert over.data == cfg.data
    one = load_config(_write(tmp_path, {"data": {"path": "/d/one"}}))
    assert [(s.path, s.weight) for s in one.data.sources()] == [("/d/one", 1.0)] and one.data.source_key(0) == "data.path"
    assert load_config(_write(tmp_path, {})).data.sources() == []  # a model-only config (params, convert)


def test_params_report_on_the_published_671b_shape(capsys):
    assert params_main([str(CONFIGS / "deepseek-v3-671b.yaml"), "model.mtp_depth=0", "--gpus", "1024"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert round(report["total_params"] / 1e9) == 671
    assert round(report["active_params"] / 1e9) == 37
    # each of DeepSeek-V3's 1024 GPUs (EP 64, ZeRO-3) holds 1/1024 of every state: 10.5 GB in all
    per_gpu = -(-report["total_params"] // 1024)
    assert report["model_states_per_gpu"] == {
        "gpus": 1024, "zero_stage": 3, "expert_parallel_size": 64, "precision": "fp8", "weights": 2 * per_gpu,
        "gradients": 2 * per_gpu, "master_weights": 4 * per_gpu, "optimizer_moments": 8 * per_gpu,
        "total": 16 * per_gpu}
    # 61 layers x (512 latent + 64 rope) x 2 bytes
    assert report["kv_cache_bytes_per_token"] == 61 * 576 * 2
    assert report["shape"]["n_layers"] == 61 and report["shape"]["n_routed_experts"] == 256


def test_params_schedule_shows_deepseek_v3s_published_schedule_on_1024_gpus(capsys):
    """--schedule walks the config's run as training takes it: DeepSeek-V3's config warms up over 2000 steps of
    3072 sequences of 4096 tokens, ends its batch ramp at 469B tokens (the first step of 15360 sequences), holds
    2.2e-4 to 10.0T tokens (step 167,815) and ends its cosine at 2.2e-5 at 14.3T: the numbers its comment gives."""
    assert params_main([str(CONFIGS / "deepseek-v3-671b.yaml"), "--gpus", "1024", "--schedule"]) == 0
    rows = {row["at"]: row for row in json.loads(capsys.readouterr().out)["schedule"]}
    assert [(r["step"], r["tokens"], r["batch_sequences"]) for r in rows.values()] == [
        (1, 3072 * 4096, 3072), (2000, 2000 * 3072 * 4096, 3072), (16324, 469_116_125_184, 15360),
        (59040, 3_156_574_470_144, 15360), (118080, 6_871_050_092_544, 15360),
        (167815, 10_000_105_734_144, 15360), (177120, 10_585_525_714_944, 15360), (236160, 14_300_001_337_344, 15360)]
    assert rows["warmup's last step"]["lr"] == rows["last step at train.lr before the decay"]["lr"] == 2.2e-4
    assert rows["first step"]["lr"] == pytest.approx(2.2e-4 / 2000) and rows["last step"]["lr"] == pytest.approx(2.2e-5)
    assert list(rows)[2] == "the batch ramp's first full batch"


def test_params_schedule_on_the_token_clock(capsys):
    """The smoke config under a ramp of 1 to 4 micro-steps (of 4 x 64 tokens) over 5000 tokens, on the token clock:
    its warmup of 5 full batches (5 x 1024 tokens) ends at step 12, the last within 5 full batches' worth (4608
    tokens), at lr x 4.5 / 5."""
    assert params_main([str(CONFIGS / "smoke.yaml"), "--schedule", "train.batch_rampup_tokens=5000",
                        "train.grad_accum_steps=4", "train.lr_schedule_unit=tokens"]) == 0
    rows = json.loads(capsys.readouterr().out)["schedule"]
    lr = load_config(CONFIGS / "smoke.yaml").train.lr
    assert [(r["step"], r["tokens"], r["batch_sequences"], r["at"]) for r in rows] == [
        (1, 256, 4, "first step"), (10, 3328, 8, "1/4 of the run"), (12, 4608, 12, "warmup's last step"),
        (14, 6400, 16, "the batch ramp's first full batch"), (20, 12544, 16, "2/4 of the run"),
        (30, 22784, 16, "3/4 of the run"), (40, 33024, 16, "last step")]
    assert rows[2]["lr"] == pytest.approx(lr * 4.5 / 5, rel=1e-12)


def _milestones_walked(cfg, world_size: int) -> list[dict]:
    """schedule_milestones' rows found by walking every step of the run, as training takes them."""
    from deepseek_pt.engine.batch_rampup import grad_accum_steps_at
    from deepseek_pt.engine.lr_schedule import full_batch_tokens, lr_at, lr_at_position, run_full_batches

    t, rows, seen, previous = cfg.train, [], 0, None
    per_micro_step, full = t.micro_batch_size * world_size, full_batch_tokens(cfg, world_size)
    end = run_full_batches(cfg, world_size)
    labels = {1: ["first step"]}
    for q in (1, 2, 3):
        labels.setdefault(max(1, t.max_steps * q // 4), []).append(f"{q}/4 of the run")
    if t.schedule == "wsd":
        labels.setdefault(t.wsd_decay_start, []).append("last step at train.lr before the decay")
    labels.setdefault(t.max_steps, []).append("last step")
    ramp_over = not t.batch_rampup_tokens
    for step in range(1, t.max_steps + 1):
        accum = grad_accum_steps_at(t, seen)
        seen += accum * per_micro_step * cfg.data.seq_len
        position = seen / full if t.lr_schedule_unit == "tokens" else step
        lr = lr_at_position(t, position, end) if t.lr_schedule_unit == "tokens" else lr_at(cfg, step - 1)
        row = {"step": step, "tokens": seen, "batch_sequences": accum * per_micro_step, "lr": lr, "at": []}
        if previous and previous[0] <= t.warmup_steps < position:
            previous[1]["at"].append("warmup's last step")
            rows += [] if previous[1] in rows else [previous[1]]
        if not ramp_over and accum == t.grad_accum_steps:
            ramp_over = True
            row["at"].append("the batch ramp's first full batch")
        row["at"] += labels.get(step, [])
        rows += [row] if row["at"] else []
        previous = (position, row)
    return [{**row, "at": "; ".join(row["at"])} for row in rows]


@pytest.mark.parametrize("overrides", [
    [], ["train.max_steps=1", "train.warmup_steps=1"], ["train.warmup_steps=0"], ["train.schedule=constant"],
    ["train.schedule=wsd", "train.wsd_decay_fraction=0.3"],
    ["train.schedule=wsd", "train.max_steps=1", "train.warmup_steps=0"],
    ["train.batch_rampup_tokens=5000", "train.grad_accum_steps=4"],
    ["train.batch_rampup_tokens=5000", "train.grad_accum_steps=4", "train.lr_schedule_unit=tokens"],
    ["train.batch_rampup_tokens=9000", "train.grad_accum_steps=3", "train.lr_schedule_unit=tokens",
     "train.warmup_steps=7", "train.max_steps=333", "train.schedule=wsd"],
    ["train.batch_rampup_tokens=100000000", "train.grad_accum_steps=4", "train.batch_rampup_start=2"],  # never ends
])
def test_schedule_milestones_are_the_rows_a_step_by_step_walk_finds(overrides):
    """schedule_milestones walks only the batch ramp and computes the full-batch steps after it (a run of millions of
    steps is not walked): its rows are those of a walk through every step, on 1 and on 3 processes."""
    from deepseek_pt.engine.lr_schedule import schedule_milestones

    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    for world_size in (1, 3):
        assert schedule_milestones(cfg, world_size) == _milestones_walked(cfg, world_size), (overrides, world_size)


def test_params_reports_each_gpus_model_states_under_the_configs_zero_stage(capsys):
    """--gpus N: the routed experts split over EP ranks, each held by N / EP of them; ZeRO-3 partitions every state
    over all N (the 671B test above), stage 1 only AdamW's moments (and the master weights, which fp32 has not):
    weights and gradients whole."""
    smoke = str(CONFIGS / "smoke.yaml")  # EP 2, fp32 (no master copy), no MTP
    assert params_main([smoke, "parallel.zero_stage=1", "--gpus", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    experts = report["routed_expert_params"]
    held, partitioned = report["total_params"] - experts // 2, -(-report["total_params"] // 4)
    assert {k: report["model_states_per_gpu"][k] for k in ("weights", "gradients", "master_weights",
                                                           "optimizer_moments")} == {
        "weights": 4 * held, "gradients": 4 * held, "master_weights": 0, "optimizer_moments": 8 * partitioned}
    assert params_main([smoke, "--gpus", "3"]) == 2
    assert "--gpus 3: must be a positive multiple of parallel.expert_parallel_size (2)" in capsys.readouterr().err


@pytest.mark.parametrize("config, overrides, world, gib, message", [
    ("deepseek-v3-671b.yaml", [], 64, 80, r"model states: each of 64 GPUs would hold at least 158\.9 GiB \(weights "
     r"19\.9, gradients 19\.9, master weights 39\.7, optimizer moments 79\.5\) under parallel.zero_stage 3 with "
     r"parallel.expert_parallel_size 64, more than the 80\.0 GiB of its H100; at least 128 GPUs under ZeRO-3 "
     r"\(before activations\)$"),
    ("bench-2b.yaml", ["parallel.zero_stage=1"], 2, 16, r"each of 2 GPUs would hold at least 18\.3 GiB .* under "
     r"parallel.zero_stage 1 with parallel.expert_parallel_size 1, more than the 16\.0 GiB of its H100; "
     r"parallel.zero_stage: 3 partitions weights and gradients too \(14\.7 GiB each here\)$"),
    ("bench-2b.yaml", [], 1, 24, r"at least 2 GPUs under ZeRO-3 \(before activations\)$"),
    ("bench-2b.yaml", [], 1, 80, None),  # 29.3 GiB of states: activations decide
])
def test_preflight_refuses_model_states_that_cannot_fit_the_gpu(tmp_path, monkeypatch, config, overrides, world, gib,
                                                                message):
    """Before DeepSpeed starts (it would run out of GPU memory building its optimizer, a traceback from deep inside):
    engine/model_states.py's lower bound against the GPU's memory, with the fixes that would make room."""
    import deepseek_pt.engine.preflight as preflight_checks

    monkeypatch.setattr(preflight_checks, "host_memory_available", lambda: None)
    monkeypatch.setattr(preflight_checks, "gpu_memory", lambda: ("H100", gib * 2**30))
    cfg = load_config(CONFIGS / config, [f"data.path={ASSETS / 'smoke_shards'}", "data.seq_len=32",
                                         "train.eval_every=0", f"run.dir={tmp_path / 'run'}", *overrides])
    if message is None:
        assert preflight_checks.model_states_refusal(cfg, world, preflight_checks.gpu_memory(),
                                                     preflight_checks.expert_and_other_params(cfg)) is None
        return
    with pytest.raises(preflight_checks.PreflightError, match=message):
        preflight_checks.preflight(cfg, world_size=world)


def test_params_cli_reports_bad_config(tmp_path, capsys):
    assert params_main([str(_write(tmp_path, {"model": {"moe": {"top_k": 0}}}))]) == 2
    assert "model.moe.top_k: must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("cuda, ds_accelerator, why", [
    (False, None, "no GPU is visible here"),
    # DeepSpeed's CPU accelerator on a GPU host: its launcher still gives each rank CUDA_VISIBLE_DEVICES
    (True, "cpu", "DS_ACCELERATOR=cpu is set"),
])
def test_nccl_without_a_gpu_is_refused_before_the_rendezvous(monkeypatch, cuda, ds_accelerator, why):
    """parallel.backend=nccl on a CPU machine was accepted, then DeepSpeed's init_distributed raised 'Distributed
    package doesn't have NCCL built in' (a traceback) after building its CPU collectives."""
    from deepseek_pt.engine import distributed
    from deepseek_pt.engine.accelerator import on_gpu

    cfg = load_config(CONFIGS / "smoke.yaml", ["parallel.backend=nccl"])
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: cuda)
    if ds_accelerator:
        monkeypatch.setenv("DS_ACCELERATOR", ds_accelerator)
    assert not on_gpu()
    monkeypatch.setattr(distributed, "rendezvous_env", lambda: pytest.fail("reached the rendezvous"))
    with pytest.raises(distributed.PreflightError, match=rf"^parallel.backend: nccl needs CUDA GPUs and a torch "
                                                         rf"built with NCCL, and {why}: use parallel.backend=auto"):
        distributed.init_distributed(cfg)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert on_gpu() == cuda  # without DS_ACCELERATOR, torch's answer


@pytest.mark.parametrize("overrides, message", [
    (["model.dim=66"], "model.dim: 66 is not a multiple of 4, which the routed experts' grouped GEMMs need at precision fp32"),
    (["precision=bf16", "model.dim=68"], "model.dim: 68 is not a multiple of 8, which the routed experts' grouped GEMMs need"),
    (["model.moe.expert_inter_dim=30"], "model.moe.expert_inter_dim: 30 is not a multiple of 4"),
])
def test_preflight_refuses_expert_widths_grouped_gemms_cannot_take(tmp_path, monkeypatch, overrides, message):
    """Accepted, these were a 'strides should be multiple of 16 bytes' traceback from torch._grouped_mm in the first
    forward. The model alone (generation, conversion: our own MoE) takes them, so load_config does."""
    import deepseek_pt.engine.preflight as preflight_checks

    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.path={ASSETS / 'smoke_shards'}", f"run.dir={tmp_path / 'run'}",
                                               *overrides])
    monkeypatch.setattr(preflight_checks, "host_memory_available", lambda: None)
    with pytest.raises(preflight_checks.PreflightError, match=f"^{re.escape(message)}"):
        preflight_checks.preflight(cfg, world_size=2)
    preflight_checks.preflight(load_config(CONFIGS / "smoke.yaml", [f"data.path={ASSETS / 'smoke_shards'}",
                                                                    f"run.dir={tmp_path}", *overrides,
                                                                    "model.moe.n_dense_layers=2"]), world_size=2)


@pytest.mark.parametrize("schedule, message", [
    ("cosine", "more than the run's 2.00: under the batch ramp, train.max_steps 8 steps on 2 processes train 2.00 full "
               "batches' worth; lower train.warmup_steps, or raise train.max_steps"),
    ("wsd", "more than schedule wsd's stable phase, which ends at 1.75: under the batch ramp, train.max_steps 8 steps "
            "on 2 processes train 2.00 full batches' worth"),
])
def test_preflight_refuses_a_token_clock_warmup_the_batch_ramp_leaves_no_room_for(tmp_path, monkeypatch, schedule,
                                                                                   message):
    """train.lr_schedule_unit=tokens counts the warmup in full batches' worth of tokens: a ramp whose 8 steps of one
    micro-step (of 4) read 2 full batches cannot warm up over 5; the step clock can, and so can the token clock
    without the ramp."""
    import deepseek_pt.engine.preflight as preflight_checks

    monkeypatch.setattr(preflight_checks, "host_memory_available", lambda: None)
    base = [f"data.path={ASSETS / 'smoke_shards'}", f"run.dir={tmp_path / 'run'}", "train.max_steps=8",
            "train.warmup_steps=5", "train.grad_accum_steps=4", f"train.schedule={schedule}"]
    ramp = ["train.batch_rampup_start=1", f"train.batch_rampup_tokens={32 * 4 * 2 * 64}"]
    cfg = load_config(CONFIGS / "smoke.yaml", [*base, *ramp, "train.lr_schedule_unit=tokens"])
    with pytest.raises(preflight_checks.PreflightError, match="^train.warmup_steps: 5 full batches' worth of tokens on "
                                                              "train.lr_schedule_unit: tokens, " + re.escape(message)):
        preflight_checks.preflight(cfg, world_size=2)
    preflight_checks.preflight(load_config(CONFIGS / "smoke.yaml", [*base, *ramp]), world_size=2)
    preflight_checks.preflight(load_config(CONFIGS / "smoke.yaml", [*base, "train.lr_schedule_unit=tokens"]),
                               world_size=2)


@pytest.mark.parametrize("workspace, refused", [(":0:0", True), (":16:8", False), (None, False)])
def test_preflight_refuses_a_cublas_workspace_that_defeats_train_deterministic(tmp_path, monkeypatch, workspace,
                                                                                refused):
    import deepseek_pt.engine.preflight as preflight_checks

    monkeypatch.setattr(preflight_checks, "host_memory_available", lambda: None)
    if workspace is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", workspace)
    base = [f"data.path={ASSETS / 'smoke_shards'}", f"run.dir={tmp_path / 'run'}"]
    preflight_checks.preflight(load_config(CONFIGS / "smoke.yaml", base), world_size=2)  # only train.deterministic asks
    cfg = load_config(CONFIGS / "smoke.yaml", [*base, "train.deterministic=true"])
    if refused:
        with pytest.raises(preflight_checks.PreflightError, match=r"^train.deterministic: CUBLAS_WORKSPACE_CONFIG="
                                                                  r"':0:0' in the environment; cuBLAS repeats"):
            preflight_checks.preflight(cfg, world_size=2)
    else:
        preflight_checks.preflight(cfg, world_size=2)


def test_every_config_key_is_documented_where_it_is_declared():
    # show_config --key prints these: a field added without the text under it would print "(no documentation)".
    from deepseek_pt.config import Config, key_paths
    from deepseek_pt.show_config import field_docs

    docs = field_docs()
    assert set(docs) == set(key_paths(Config)) and len(docs) > 100
    assert [k for k, text in docs.items() if not text] == []
    assert docs["train.keep_every"].startswith("Also keep, whatever keep_last says")


def test_show_config_prints_what_a_run_would_use_and_explains_keys(tmp_path, capsys):
    from deepseek_pt.config import load_config
    from deepseek_pt.show_config import main

    smoke = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
    assert main([str(smoke), "train.max_steps=7"]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    assert load_config(resolved) == load_config(smoke, ["train.max_steps=7"])  # every key, defaults filled in
    assert main([str(smoke), "precision=fp8", "--key", "train.keep_last", "--key", "fp8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train.keep_last: 3  (int; default 3)\n    Checkpoints to keep;"), out
    assert "\nfp8.recipe: tensorwise  ('tensorwise' | 'rowwise' | 'rowwise_with_gw_hp' | 'blockwise'; default " \
           "tensorwise)\n" in out and "\nfp8.dense_mlp: false  (bool; default false)\n" in out, out
    assert main([str(smoke), "train.keep_last=5", "--changed"]) == 0
    changed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert "train.keep_last" in changed and "model.dim" in changed and "train.keep_every" not in changed, changed
    assert main([str(tmp_path / "missing.yaml"), "--changed"]) == 2  # no such file
    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert main([str(tmp_path / "defaults.yaml"), "--changed"]) == 0
    assert capsys.readouterr().out == "every key has its default\n"
    assert main([str(smoke), "--key", "train.keep_evry"]) == 2
    assert ("error: --key train.keep_evry: no such key or section; did you mean train.keep_every"
            in capsys.readouterr().err)
    assert main([str(smoke), "train.bogus=1"]) == 2 and "train.bogus: unknown key" in capsys.readouterr().err
