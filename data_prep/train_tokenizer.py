"""Train a sentencepiece tokenizer for pretraining.

Writes OUT/tokenizer.model, OUT/tokenizer.vocab (piece<TAB>score per id) and OUT/tokenizer.json
(ids of the special tokens, options, inputs, sha256 of the model). The model is lossless on any
text: identity normalisation, no dummy prefix, whitespace kept, and byte fallback for characters
outside the vocabulary, so decode(encode(text)) == text. Digits are split one per token.

    python data_prep/train_tokenizer.py --input corpus/ --vocab-size 32000 --out tok/
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece as spm
from tqdm import tqdm

from data_prep.common import make_output_dir, non_negative_int, positive_int, run_cli
from data_prep.sources import TXT_DOC_MODES, Input, iter_texts, resolve_inputs
from deepseek_pt.data import DataError
from deepseek_pt.data.format import FIM_SYMBOLS
from deepseek_pt.fileio import atomic_write_bytes, atomic_write_json

TOKENIZER_FORMAT = "deepseek_pt.tokenizer"
SPECIALS = {"pad_id": "<pad>", "unk_id": "<unk>", "bos_id": "<s>", "eos_id": "</s>"}


def sample_texts(inputs: list[Input], sample_docs: int, text_field: str, txt_doc: str, streaming: bool,
                 progress: bool = True):
    """Up to `sample_docs` documents (0 = all), spread over the inputs: each takes an equal share of
    what is left, so one large first file cannot supply the whole sample."""
    # No total: the corpus may hold fewer documents than the cap, and a bar sized by it showed a false ETA
    cap = f" (at most {sample_docs:,})" if sample_docs else ""
    bar = tqdm(unit="doc", desc=f"reading documents{cap}", disable=not progress)
    taken = 0
    for k, inp in enumerate(inputs):
        quota = -(-(sample_docs - taken) // (len(inputs) - k)) if sample_docs else None
        n = 0
        for text in iter_texts(inp, text_field, txt_doc, streaming):
            if quota is not None and n >= quota:
                break
            if text and not text.isspace():
                n += 1
                bar.update()
                yield text
        taken += n
    bar.close()


def sentences(text: str, max_chars: int) -> list[str]:
    """A document's training sentences: its non-blank lines, cut to at most max_chars characters
    (sentencepiece silently drops longer ones)."""
    return [line[i:i + max_chars] for line in text.splitlines() if line and not line.isspace()
            for i in range(0, len(line), max_chars)]


def sample_lines(texts, max_lines: int, max_chars: int) -> tuple[list[str], int]:
    """(training lines, documents read): a uniform sample of at most max_lines lines (0 = all),
    by seeded reservoir sampling, so memory stays bounded however many documents are read."""
    rng, lines, seen, docs = random.Random(0), [], 0, 0
    for text in texts:
        docs += 1
        for line in sentences(text, max_chars):
            seen += 1
            if not max_lines or len(lines) < max_lines:
                lines.append(line)
            elif (j := rng.randrange(seen)) < max_lines:
                lines[j] = line
    return lines, docs


def _check_ids(ids: dict[str, int], vocab_size: int) -> None:
    for name in ("unk_id", "eos_id"):
        if ids[name] < 0:
            raise DataError(f"--{name.replace('_', '-')} {ids[name]}: this id is required (>= 0)")
    used = {}
    for name, value in ids.items():
        if value < -1 or value >= vocab_size:
            raise DataError(f"--{name.replace('_', '-')} {value}: must be in [0, {vocab_size}) or -1 (disabled)")
        if value >= 0 and value in used:
            raise DataError(f"--{name.replace('_', '-')} {value}: same id as --{used[value].replace('_', '-')}")
        used[value] = name


def _check_symbols(symbols: list[str], ids: dict[str, int]) -> None:
    # sentencepiece turns a symbol spelled like a special token into a user piece and silently
    # drops that special id (eos_id() == -1), which tokenizer.json would still claim
    specials = {piece: name for name, piece in SPECIALS.items() if ids[name] >= 0}
    for i, sym in enumerate(symbols):
        if not sym:
            raise DataError("--user-defined-symbols '': an empty string is not a symbol")
        if sym in specials:
            flag = "--" + specials[sym].replace("_", "-")
            raise DataError(f"--user-defined-symbols {sym!r}: is the piece of {flag}; choose another spelling")
        if sym in symbols[:i]:
            raise DataError(f"--user-defined-symbols {sym!r}: given twice")


def train(inputs: list[str], vocab_size: int, out: str | Path, model_type: str = "bpe",
          sample_docs: int = 1_000_000, max_sentences: int = 10_000_000, character_coverage: float = 0.9995,
          text_field: str = "text", txt_doc: str = "document", pad_id: int = 0, unk_id: int = 1,
          bos_id: int = 2, eos_id: int = 3, user_defined_symbols: list[str] = (),
          max_sentence_chars: int = 8192, num_threads: int | None = None, streaming: bool = True,
          overwrite: bool = False, progress: bool = True, verbose: bool = False) -> dict:
    """Train and write the tokenizer into `out`; returns the tokenizer.json content."""
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type {model_type!r} is not bpe or unigram")
    if not 0 < character_coverage <= 1:
        raise DataError(f"character_coverage {character_coverage} is not in (0, 1]")
    ids = {"pad_id": pad_id, "unk_id": unk_id, "bos_id": bos_id, "eos_id": eos_id}
    _check_ids(ids, vocab_size)
    _check_symbols(list(user_defined_symbols), ids)
    out = Path(out)
    model_file = out / "tokenizer.model"
    if model_file.exists() and not overwrite:
        raise DataError(f"{model_file} exists; pass --overwrite to replace it")
    resolved = resolve_inputs(list(inputs), exclude=out)
    make_output_dir(out)  # before training, which can take hours

    lines, n_docs = sample_lines(sample_texts(resolved, sample_docs, text_field, txt_doc, streaming, progress),
                                 max_sentences, max_sentence_chars)
    if not lines:
        raise DataError(f"inputs {', '.join(inputs)}: no non-empty text in field {text_field!r}")
    if progress:
        print(f"training a {model_type} tokenizer of {vocab_size} pieces on {len(lines)} lines", file=sys.stderr)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, max_sentence_length=max_sentence_chars * 4,
            user_defined_symbols=list(user_defined_symbols), num_threads=num_threads or os.cpu_count(),
            minloglevel=0 if verbose else 2,
            **ids, **{name.replace("_id", "_piece"): piece for name, piece in SPECIALS.items()},
        )
    except RuntimeError as e:  # sentencepiece reports bad settings (vocab too small/large) this way
        reason = re.sub(r"^.*?\) \[.*\] ", "", str(e).splitlines()[0])  # drop its source location
        raise DataError(f"--vocab-size {vocab_size}, --model-type {model_type}: sentencepiece training "
                        f"failed: {reason}") from None

    data = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    # tokenizer.json (the model's sha256) is written last and an old one removed first: a write cut short
    # leaves no description of a model that is not there.
    (out / "tokenizer.json").unlink(missing_ok=True)
    atomic_write_bytes(model_file, data)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    atomic_write_bytes(out / "tokenizer.vocab", vocab.encode())
    info = {
        "format": TOKENIZER_FORMAT, "model": model_file.name, "sha256": hashlib.sha256(data).hexdigest(),
        "model_type": model_type, "vocab_size": sp.get_piece_size(),
        **{name: (value if value >= 0 else None) for name, value in ids.items()},
        "byte_fallback": True, "split_digits": True, "normalization": "identity",
        "character_coverage": character_coverage, "user_defined_symbols": list(user_defined_symbols),
        "training": {"documents": n_docs, "lines": len(lines), "sample_docs": sample_docs,
                     "max_sentences": max_sentences, "text_field": text_field, "txt_doc": txt_doc,
                     "inputs": [i.to_json() for i in resolved]},
        "sentencepiece_version": spm.__version__,
    }
    atomic_write_json(out / "tokenizer.json", info)
    return info


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_tokenizer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files (.txt .jsonl .json .parquet, optionally .gz/.zst...), directories, globs, "
                        "or hf:NAME[:CONFIG][@SPLIT] Hub datasets")
    p.add_argument("--vocab-size", type=positive_int, required=True, metavar="N", help="pieces in the vocabulary")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--sample-docs", type=non_negative_int, default=1_000_000, metavar="N",
                   help="documents to train on, spread over the inputs (0 = all; default %(default)s)")
    p.add_argument("--max-sentences", type=non_negative_int, default=10_000_000, metavar="N",
                   help="lines sampled from those documents to train on (0 = all; default %(default)s)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters given their own piece; the rest fall back to bytes")
    p.add_argument("--text-field", default="text", help="field holding the text in json/parquet rows")
    p.add_argument("--txt-doc", choices=TXT_DOC_MODES, default="document",
                   help="what one document is in a .txt file (default: the whole file)")
    p.add_argument("--pad-id", type=int, default=0, help="id of <pad> (-1: none)")
    p.add_argument("--unk-id", type=int, default=1, help="id of <unk>")
    p.add_argument("--bos-id", type=int, default=2, help="id of <s> (-1: none)")
    p.add_argument("--eos-id", type=int, default=3, help="id of </s>, the end-of-document token")
    p.add_argument("--user-defined-symbols", nargs="*", default=[], metavar="SYM",
                   help="strings always kept as one piece")
    p.add_argument("--fim", action="store_true",
                   help=f"also keep fill-in-the-middle's pieces {' '.join(FIM_SYMBOLS)} (build_shards.py --fim-rate)")
    p.add_argument("--max-sentence-chars", type=positive_int, default=8192,
                   help="longer lines are cut into pieces of this many characters")
    p.add_argument("--num-threads", type=positive_int, default=None, help="training threads (default: all cores)")
    p.add_argument("--no-streaming", dest="streaming", action="store_false",
                   help="load inputs through the datasets cache instead of streaming them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    return p


def _main(argv: list[str] | None) -> int:
    a = _parser().parse_args(argv)
    info = train(a.input, a.vocab_size, a.out, model_type=a.model_type, sample_docs=a.sample_docs,
                 max_sentences=a.max_sentences, character_coverage=a.character_coverage,
                 text_field=a.text_field, txt_doc=a.txt_doc, pad_id=a.pad_id, unk_id=a.unk_id,
                 bos_id=a.bos_id, eos_id=a.eos_id,
                 user_defined_symbols=a.user_defined_symbols + [s for s in FIM_SYMBOLS if a.fim
                                                                and s not in a.user_defined_symbols],
                 max_sentence_chars=a.max_sentence_chars, num_threads=a.num_threads, streaming=a.streaming,
                 overwrite=a.overwrite, progress=not a.quiet, verbose=a.verbose)
    print(f"wrote {Path(a.out) / info['model']} ({info['vocab_size']} pieces, sha256 {info['sha256'][:12]}...)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
