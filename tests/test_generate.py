"""Generation (compressed-cache decoding, sampling, CLI) and evaluation (loss, CLI)."""
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from deepseek_pt.evaluate import evaluate, main as evaluate_main
from deepseek_pt.export import save_export
from deepseek_pt.generate import cache_report, filter_logits, generate_tokens, main as generate_main, sample
from deepseek_pt.interop.hf import save_hf
from deepseek_pt.model import Transformer, to_output_subspace
from model_configs import tiny


@pytest.fixture(autouse=True)
def one_thread():
    """Token-by-token decoding of tiny models: thread hand-offs cost more than they save (much more on a
    busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(cfg, seed=0, std=0.15) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg.model).eval()
    with torch.no_grad():  # larger than init, so that greedy continuations vary
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std)
    return model


@pytest.mark.parametrize("variant", ["q_lora+yarn", "no_q_lora+plain_rope", "mla_o"])
def test_cached_and_uncached_greedy_decoding_agree(variant):
    cfg = tiny(**({"attention__q_lora_rank": 0, "attention__rope": {"theta": 500.0}} if variant == "no_q_lora+plain_rope" else {}))
    model = random_model(cfg)
    if variant == "mla_o":
        to_output_subspace(model, 16)
    prompt = torch.randint(0, cfg.model.vocab_size, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    cached = list(generate_tokens(model, prompt, 50, temperature=0.0, use_cache=True))
    uncached = list(generate_tokens(model, prompt, 50, temperature=0.0, use_cache=False))
    assert cached == uncached
    assert len(cached) == 50 and len(set(cached)) > 5  # a real continuation, not one token repeated


def test_generation_stops_at_a_stop_id_and_respects_the_vocabulary():
    model = random_model(tiny())
    greedy = list(generate_tokens(model, [1, 2, 3], 30, temperature=0.0))
    stop = greedy[4]
    assert list(generate_tokens(model, [1, 2, 3], 30, temperature=0.0, stop_ids=(stop,))) == greedy[:greedy.index(stop) + 1]
    limited = list(generate_tokens(model, [1, 2, 3], 30, temperature=1.0, vocab_size=10,
                                   generator=torch.Generator().manual_seed(0)))
    assert max(limited) < 10


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # ranked: 1, 3, 2, 0
    logits = probs.log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k=2) == [1, 3]
    assert kept(top_p=0.5) == [1]  # the best token alone reaches 0.5
    assert kept(top_p=0.7) == [1, 3]
    assert kept(top_p=0.81) == [1, 2, 3]
    assert kept(top_k=3, top_p=0.7) == [1, 3]
    assert kept() == [0, 1, 2, 3]


def test_a_tiny_temperature_samples_the_argmax():
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -7.0, -6.0]])
    for temperature in (1e-40, 1e-300, 5e-324):  # logits / temperature alone overflow to inf: softmax nan
        assert sample(logits, temperature, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    for kw, allowed in [({}, 5), ({"top_k": 3}, 3)]:
        draws = sample(logits, temperature=0.7, generator=g, **kw)
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        expected = torch.zeros(5)
        expected[:allowed] = (logits[0, :allowed] / 0.7).softmax(-1)
        torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    assert torch.equal(sample(logits[:3], temperature=0.0), torch.zeros(3, dtype=torch.long))
    assert torch.equal(sample(logits[:3], temperature=1.0, top_k=1, generator=g), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_report_counts_the_cache_that_decoding_uses(dtype):
    model = random_model(tiny()).to(dtype)
    caches = model.new_caches(1, 10, dtype)
    per_token = sum(c.kv[0, 0].nbytes + c.pe[0, 0].nbytes for c in caches)  # what one position of each holds
    a = model.config.attention
    mha = model.config.n_layers * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * dtype.itemsize
    report = cache_report(model)
    assert f"KV cache: {per_token:,} B/token" in report and f"would take {mha:,} B/token" in report


@pytest.fixture
def pydoc(pydoc_data_dir):
    return pydoc_data_dir


@pytest.fixture
def export_1024(tmp_path, pydoc):
    """A random model over the pydoc tokenizer's 1024 pieces, exported with that tokenizer."""
    cfg = tiny(vocab_size=pydoc.vocab_size)
    return save_export(random_model(cfg, std=0.05), cfg, tmp_path / "exp", tokenizer=pydoc.tokenizer_model,
                       doc_boundary="eos")


def test_generate_cli_cached_equals_uncached(export_1024, capsys, monkeypatch):
    args = ["--checkpoint", str(export_1024), "--prompt", "The with statement", "--temperature", "0",
            "--max-new-tokens", "20", "--ignore-eos"]
    assert generate_main(args) == 0
    cached = capsys.readouterr()
    assert generate_main(args + ["--no-cache"]) == 0
    uncached = capsys.readouterr()
    assert cached.out == uncached.out and cached.out.startswith("The with statement")
    assert len(cached.out) > len("The with statement\n")
    assert "KV cache:" in cached.err and "full multi-head K/V" in cached.err and "20 new tokens" in cached.err
    monkeypatch.setattr("sys.stdin", io.StringIO("def\nclass\n"))
    assert generate_main(["--checkpoint", str(export_1024), "--interactive", "--max-new-tokens", "3", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("def") and lines[1].startswith("class")


def test_generate_cli_errors(tmp_path, pydoc, capsys):
    cfg = tiny(vocab_size=pydoc.vocab_size)
    save_export(random_model(cfg), cfg, tmp_path / "no_tok")
    assert generate_main(["--checkpoint", str(tmp_path / "no_tok"), "--prompt", "x"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(tmp_path / "no_tok"), "--prompt", "x", "--max-new-tokens", "2",
                          "--tokenizer", str(pydoc.tokenizer_model)]) == 0
    capsys.readouterr()
    for path, message in ((tmp_path / "none.model", "no such file"),
                          (tmp_path / "no_tok" / "export.json", "not a sentencepiece model: ")):
        assert generate_main(["--checkpoint", str(tmp_path / "no_tok"), "--prompt", "x", "--tokenizer", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"--tokenizer {path}: {message}" in err and "Traceback" not in err, err
    save_export(random_model(cfg), cfg, tmp_path / "bad_tok", tokenizer=b"not a sentencepiece model")
    assert generate_main(["--checkpoint", str(tmp_path / "bad_tok"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad_tok'}: its tokenizer.model: not a sentencepiece model" in err, err
    small = tiny()  # 97 ids: the 1024-piece tokenizer does not fit
    save_export(random_model(small), small, tmp_path / "small", tokenizer=pydoc.tokenizer_model)
    assert generate_main(["--checkpoint", str(tmp_path / "small"), "--prompt", "x"]) == 2
    assert "tokenizer has 1024 pieces, the model only 97" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        generate_main(["--checkpoint", str(tmp_path / "small"), "--prompt", "x", "--top-p", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        generate_main(["--checkpoint", str(tmp_path / "small"), "--prompt", "x", "--temperature", "nan"])
    assert e.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # was torch's "Overflow when unpacking long long" traceback, after the load
        generate_main(["--checkpoint", str(tmp_path / "no_tok"), "--tokenizer", str(pydoc.tokenizer_model),
                       "--prompt", "x", "--seed", str(2**64)])
    assert e.value.code == 2 and capsys.readouterr().err.endswith(f"error: --seed {2**64} is outside [-2**63, 2**64)\n")


def test_suffix_fills_in_the_middle_from_a_prompt_written_as_the_training_documents(tmp_path, fim_tokenizer_model,
                                                                                    capsys, monkeypatch):
    """--suffix: the model is prompted BEGIN prompt HOLE suffix END after the document marker, as build_shards.py
    --fim-rate writes its documents, and the output is the prompt, the middle it generates, then the suffix. A
    tokenizer without the pieces is refused, naming the piece and how to add it; --suffix needs --prompt."""
    import sentencepiece as spm

    from deepseek_pt import generate

    symbols = ["<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"]  # written out: the CLI's default, pinned here
    model_file = fim_tokenizer_model
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    begin, hole, end = (sp.piece_to_id(s) for s in symbols)
    cfg = tiny(vocab_size=1024)
    export = save_export(random_model(cfg, std=0.05), cfg, tmp_path / "exp", tokenizer=model_file, doc_boundary="eos")
    prompts = []
    real = generate.generate_tokens
    monkeypatch.setattr(generate, "generate_tokens", lambda model, prompt, *a: prompts.append(prompt) or real(
        model, prompt, *a))
    args = ["--checkpoint", str(export), "--prompt", "def f(x):\n    return ", "--suffix", "\n\nprint(f(1))",
            "--temperature", "0", "--max-new-tokens", "12"]
    assert generate_main(args) == 0
    out = capsys.readouterr().out
    assert prompts == [[sp.eos_id(), begin, *sp.encode("def f(x):\n    return "), hole, *sp.encode("\n\nprint(f(1))"),
                        end]]
    middle = [t for t in real(export_model(export), prompts[0], 12, stop_ids=(sp.eos_id(),)) if t != sp.eos_id()]
    assert out == "def f(x):\n    return " + sp.decode(middle) + "\n\nprint(f(1))\n"
    assert generate_main(["--checkpoint", str(export), "--prompt", "x", "--suffix", "y", "--fim-symbols", "<|a|>",
                          "<|b|>", "<|c|>"]) == 2
    assert capsys.readouterr().err.endswith("error: --suffix: tokenizer: has no piece '<|a|>' for fill-in-the-middle; "
                                            "train the tokenizer with train_tokenizer.py --user-defined-symbols "
                                            "'<|a|>' '<|b|>' '<|c|>'\n")
    with pytest.raises(SystemExit) as e:
        generate_main(["--checkpoint", str(export), "--interactive", "--suffix", "y"])
    assert e.value.code == 2 and "--suffix fills in after --prompt: give both" in capsys.readouterr().err


def export_model(export: Path) -> Transformer:
    from deepseek_pt.interop.checkpoints import load_checkpoint

    return load_checkpoint(str(export), torch.device("cpu"), None).model


OTHER_TOKENIZER = Path(__file__).parent / "assets" / "smoke_shards" / "tokenizer.model"
"""1024 pieces, as the pydoc tokenizer, but trained on another corpus: its ids name other pieces."""


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_generate_refuses_a_tokenizer_the_model_was_not_trained_with(export_1024, pydoc, tmp_path, capsys):
    """--tokenizer took any sentencepiece model that fit the vocabulary: the output was silently garbage."""
    prompt = ["--prompt", "x", "--max-new-tokens", "2"]
    mine, other = _sha(pydoc.tokenizer_model), _sha(OTHER_TOKENIZER)
    assert mine != other
    assert generate_main(["--checkpoint", str(export_1024), "--tokenizer", str(OTHER_TOKENIZER)] + prompt) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --tokenizer {OTHER_TOKENIZER} (sha256 {other[:12]}...) is not the tokenizer {export_1024} "
                   f"was trained with (sha256 {mine[:12]}...): its ids would name other pieces; leave out --tokenizer "
                   "to use the one stored with it\n"), err
    copy = shutil.copy(pydoc.tokenizer_model, tmp_path / "same.model")  # the same tokenizer anywhere is fine
    assert generate_main(["--checkpoint", str(export_1024), "--tokenizer", str(copy)] + prompt) == 0
    capsys.readouterr()

    # An export that knows the tokenizer's identity but stores no copy (its data's copy was removed)
    cfg = tiny(vocab_size=pydoc.vocab_size)
    save_export(random_model(cfg), cfg, tmp_path / "id_only", tokenizer_sha256=mine)
    assert generate_main(["--checkpoint", str(tmp_path / "id_only")] + prompt) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'id_only'}: holds no tokenizer.model; pass --tokenizer "
                                       f"(the one it was trained with has sha256 {mine[:12]}...)\n")
    assert generate_main(["--checkpoint", str(tmp_path / "id_only"), "--tokenizer", str(OTHER_TOKENIZER)] + prompt) == 2
    assert "pass that one (the tokenizer.model of the shard directory it was trained on)" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(tmp_path / "id_only"), "--tokenizer", str(copy)] + prompt) == 0
    capsys.readouterr()

    # An export written before the identity was recorded: its tokenizer.model is the identity
    info = json.loads((export_1024 / "export.json").read_text())
    del info["tokenizer_sha256"]
    (export_1024 / "export.json").write_text(json.dumps(info))
    assert generate_main(["--checkpoint", str(export_1024), "--tokenizer", str(OTHER_TOKENIZER)] + prompt) == 2
    assert "is not the tokenizer" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(export_1024)] + prompt) == 0


def test_a_stored_tokenizer_that_is_not_the_recorded_one_is_refused(export_1024, pydoc, capsys):
    shutil.copy(OTHER_TOKENIZER, export_1024 / "tokenizer.model")
    assert generate_main(["--checkpoint", str(export_1024), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == (
        f"error: {export_1024 / 'tokenizer.model'}: sha256 {_sha(OTHER_TOKENIZER)[:12]}... is not the tokenizer the "
        f"model was trained with ({export_1024 / 'export.json'}: tokenizer_sha256 "
        f"{_sha(pydoc.tokenizer_model)[:12]}...): put that one back\n")


def test_a_prompt_that_does_not_fit_is_named(export_1024, capsys, monkeypatch):
    # Prompts piped to --interactive: the refusal said "the prompt has N tokens", not which line of stdin
    long = "hello world " * 200
    assert generate_main(["--checkpoint", str(export_1024), "--prompt", long]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --prompt: the prompt has ")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"def\n{long}\nclass\n"))
    assert generate_main(["--checkpoint", str(export_1024), "--interactive", "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("def") and "class" not in out
    assert err.splitlines()[-1].startswith("error: stdin line 2: the prompt has "), err

def test_max_new_tokens_is_capped_at_the_models_context(export_1024, pydoc, capsys):
    """A prompt of P tokens leaves max_seq_len - P positions: --max-new-tokens beyond that generates exactly that
    many (with --ignore-eos), after a note, instead of decoding positions the model was never built for. P counts
    the EOS that precedes a document in eos-framed data (the export's doc_boundary), so P = 1 + the text's pieces."""
    import sentencepiece as spm

    prompt = "The with statement"
    p = 1 + len(spm.SentencePieceProcessor(model_file=str(pydoc.tokenizer_model)).encode(prompt))
    room = tiny().model.max_seq_len - p
    assert generate_main(["--checkpoint", str(export_1024), "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", str(room + 50), "--ignore-eos"]) == 0
    err = capsys.readouterr().err
    assert f"note: max-new-tokens {room + 50} capped at {room}" in err
    assert f"[{p} prompt + {room} new tokens" in err


def test_the_default_prompt_prefix_follows_the_training_framing(pydoc):
    """In eos-framed data every document follows an EOS (the previous document's end), in bos_eos data a BOS: the
    prompt starts with that token, as the model saw documents start. Unknown framing falls back to BOS where the
    tokenizer has one. The pydoc tokenizer's ids (bos 2, eos 3) are the build's defaults."""
    import sentencepiece as spm

    from deepseek_pt.generate import _default_prefix, prompt_ids

    sp = spm.SentencePieceProcessor(model_file=str(pydoc.tokenizer_model))
    assert (sp.bos_id(), sp.eos_id()) == (2, 3)
    assert [_default_prefix(b, sp) for b in ("eos", "bos_eos", None)] == ["eos", "bos", "bos"]
    assert prompt_ids(sp, "def", _default_prefix("eos", sp)) == [3, *sp.encode("def")]



def test_a_bad_prompt_typed_at_a_terminal_does_not_end_the_session(export_1024, capsys, monkeypatch):
    # It ended the session, and with it the loaded model; piped prompts still end the run (above)
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal(f"def\n{'hello world ' * 200}\nab\udcffcd\nclass\n"))
    assert generate_main(["--checkpoint", str(export_1024), "--interactive", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert "def" in out and "class" in out, out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0].startswith("error: stdin line 2: the prompt has "), err
    assert errors[1] == "error: stdin line 3: not UTF-8 text (an undecodable byte at character 2)", err


OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 3.20 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                 "1.02 GiB is free. Including non-PyTorch memory, this process has 78.16 GiB memory in use. If reserved "
                 "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


def test_cuda_out_of_memory_in_generate_and_evaluate_is_an_error_line(export_1024, pydoc, capsys, monkeypatch):
    """An out-of-memory error (raised here in place of decoding and of the evaluation) ends the command with one error
    line, torch's account of the allocation and the arguments that need less, exit 2; typed at a terminal it ends
    only that prompt, as a bad prompt does."""
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(OUT_OF_MEMORY)

    said = ("error: CUDA out of memory. Tried to allocate 3.20 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "1.02 GiB is free: ")
    monkeypatch.setattr("deepseek_pt.generate.generate_tokens", no_memory)
    assert generate_main(["--checkpoint", str(export_1024), "--prompt", "def"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == said + ("a shorter prompt or --max-new-tokens (the cache and the attention grow "
                                           "with both); --dtype bfloat16 where the weights load in float32; or --device cpu")
    assert "Traceback" not in err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("def\nclass\n"))
    assert generate_main(["--checkpoint", str(export_1024), "--interactive"]) == 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [err.splitlines()[-1]] * 2
    monkeypatch.setattr("deepseek_pt.evaluate.evaluate", no_memory)
    assert evaluate_main(["--checkpoint", str(export_1024), "--data", str(pydoc.shards_dir)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == said + ("a smaller --batch-size or --seq-len; --dtype "
                                                               "bfloat16 where the weights load in float32; or "
                                                               "--device cpu")


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])  # stdin under a C locale, under a UTF-8 one
def test_generate_refuses_prompts_that_are_not_utf8(export_1024, capsys, monkeypatch, errors):
    # Python stands for undecodable bytes of argv with lone surrogates: sentencepiece raised on them.
    assert generate_main(["--checkpoint", str(export_1024), "--prompt", "ab\udcffcd"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --prompt: not UTF-8 text (an undecodable byte at character 2)\n", err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"def\nab\xffcd\n"), "utf-8", errors))
    assert generate_main(["--checkpoint", str(export_1024), "--interactive", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    expected = ("error: stdin line 2: not UTF-8 text (an undecodable byte at character 2)" if errors == "surrogateescape"
                else "error: stdin: not UTF-8 text (byte 0xff: invalid start byte)")  # decoded a buffer ahead
    assert err.splitlines()[-1] == expected and "Traceback" not in err, err


@pytest.mark.parametrize("device", ["nonsense", "cuda:99"])
def test_generate_and_evaluate_refuse_an_unusable_device(export_1024, pydoc, device, capsys):
    for main, extra in ((generate_main, ["--prompt", "x"]), (evaluate_main, ["--data", str(pydoc.shards_dir)])):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(export_1024), "--device", device] + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument --device: {device!r} is not a usable device" in err, err


def test_evaluate_matches_the_models_own_loss():
    cfg = tiny()
    model = random_model(cfg, std=0.05)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 97, (2, 16), generator=g), torch.randint(0, 97, (2, 16), generator=g)) for _ in range(3)]
    result = evaluate(model, batches)
    with torch.no_grad():
        expected = torch.stack([model(x, y) for x, y in batches]).mean().item()
    assert result["tokens"] == 3 * 2 * 16 and result["batches"] == 3
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["tokens_per_s"] > 0


def test_evaluate_cli_on_an_export_and_its_hf_copy(export_1024, tmp_path, pydoc, capsys):
    argv = ["--data", str(pydoc.shards_dir), "--seq-len", "32", "--batch-size", "2", "--max-sequences", "6", "--json"]
    assert evaluate_main(["--checkpoint", str(export_1024)] + argv) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert from_export["tokens"] == 3 * 2 * 32 and math.isfinite(from_export["loss"])
    from deepseek_pt.export import load_export
    save_hf(load_export(export_1024)[0], tmp_path / "hf")
    assert evaluate_main(["--checkpoint", str(tmp_path / "hf")] + argv) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(from_export["loss"], rel=1e-6)
    in_bf16 = []
    for name in ("bfloat16", "bf16"):  # torch's name and the short one training's precision uses
        assert evaluate_main(["--checkpoint", str(export_1024), "--dtype", name] + argv) == 0
        in_bf16.append(json.loads(capsys.readouterr().out)["loss"])
    assert in_bf16[0] == in_bf16[1] != from_export["loss"]
    by_batch = []
    for batch_size in (1, 3, 7):  # whatever --batch-size, every sample counts (the last batch's padding none)
        assert evaluate_main(["--checkpoint", str(export_1024), "--data", str(pydoc.shards_dir), "--seq-len", "32",
                              "--batch-size", str(batch_size), "--json"]) == 0
        by_batch.append(json.loads(capsys.readouterr().out))
    assert len({r["tokens"] for r in by_batch}) == 1 and by_batch[1]["batches"] == -(-by_batch[0]["batches"] // 3)
    assert [r["loss"] for r in by_batch] == pytest.approx([by_batch[0]["loss"]] * 3, rel=1e-6)
    assert {r["sequences"] for r in by_batch} == {by_batch[0]["batches"]}  # batch size 1: a sequence a batch
    assert evaluate_main(["--checkpoint", str(export_1024), "--data", str(pydoc.shards_dir), "--seq-len", "32",
                          "--batch-size", "7"]) == 0  # the text line says what ran
    n = by_batch[0]["sequences"]
    assert n % 7 and f"{n} sequences of 32 in {-(-n // 7)} batches of 7;" in capsys.readouterr().out
    assert evaluate_main(["--checkpoint", str(export_1024), "--data", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as refused:  # the flag it replaced, named with its replacement
        evaluate_main(["--checkpoint", str(export_1024), "--data", str(pydoc.shards_dir), "--max-batches", "2"])
    assert refused.value.code == 2 and "--max-batches: replaced by --max-sequences N" in capsys.readouterr().err


def test_evaluate_refuses_shards_of_another_tokenizer(export_1024, capsys):
    # tests/assets/smoke_shards: vocabulary 1024 as the pydoc shards, but another tokenizer, so its ids
    # name other pieces: the loss was computed anyway and meant nothing.
    from deepseek_pt.data import open_manifest
    other = open_manifest("tests/assets/smoke_shards")
    import hashlib
    assert other.tokenizer_sha256 != hashlib.sha256((export_1024 / "tokenizer.model").read_bytes()).hexdigest()
    assert evaluate_main(["--checkpoint", str(export_1024), "--data", "tests/assets/smoke_shards",
                          "--seq-len", "32", "--max-sequences", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "another tokenizer" in err and "Traceback" not in err


def test_evaluate_refuses_shards_of_another_tokenizer_by_the_recorded_identity(pydoc, tmp_path, capsys):
    # An export without its tokenizer's copy was checked against nothing
    cfg = tiny(vocab_size=pydoc.vocab_size)
    save_export(random_model(cfg), cfg, tmp_path / "id_only", tokenizer_sha256=_sha(pydoc.tokenizer_model))
    argv = ["--checkpoint", str(tmp_path / "id_only"), "--seq-len", "32", "--max-sequences", "1"]
    assert evaluate_main(argv + ["--data", "tests/assets/smoke_shards"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"another tokenizer than the one {tmp_path / 'id_only'} was trained" in err
    assert evaluate_main(argv + ["--data", str(pydoc.shards_dir)]) == 0
