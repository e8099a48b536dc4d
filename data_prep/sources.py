"""Input files and Hub datasets -> a deterministic stream of documents, read through HF `datasets`.

Local inputs are read in streaming mode by default: rows come straight from the files in file
order, nothing is copied into the datasets cache and memory stays flat whatever the input size.
Every document has a position (input index, row index) so that a build can resume mid-corpus.
"""
from __future__ import annotations

import glob
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from deepseek_pt.data import DataError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TXT_DOC_MODES = ("document", "paragraph", "line")
HUB_PREFIX = "hf:"
_READ_ROWS = 128


@dataclass(frozen=True)
class Input:
    spec: str
    """Absolute file path, or hf:NAME[:CONFIG][@SPLIT] for a Hugging Face Hub dataset."""
    builder: str
    """datasets builder: text, json, parquet, or hub."""
    bytes: int | None = None
    mtime_ns: int | None = None

    def to_json(self) -> dict:
        return {"path": self.spec, "format": self.builder, "bytes": self.bytes, "mtime_ns": self.mtime_ns}


def _builder(path: Path) -> str | None:
    name = path.name.lower()
    for comp in COMPRESSIONS:
        name = name.removesuffix(comp)
    return BUILDERS.get(Path(name).suffix)


def _file_input(path: Path, spec: str) -> Input:
    builder = _builder(path)
    if builder is None:
        raise DataError(f"input {spec}: unsupported file type (supported: {', '.join(BUILDERS)}, "
                        f"optionally compressed {', '.join(COMPRESSIONS)})")
    if builder == "parquet" and path.name.lower().endswith(COMPRESSIONS):
        raise DataError(f"input {spec}: a compressed parquet file cannot be read (parquet compresses its "
                        "columns itself); decompress it")
    if path.name.lower().endswith(".zst") and importlib.util.find_spec("zstandard") is None:
        raise DataError(f"input {spec}: reading .zst needs the zstandard package (pip install zstandard)")
    st = path.stat()
    return Input(str(path.resolve()), builder, st.st_size, st.st_mtime_ns)


def resolve_inputs(specs: list[str], exclude: str | Path | None = None) -> list[Input]:
    """Expand paths, directories (recursively, sorted, hidden entries skipped) and globs;
    `hf:` names pass through. Files under `exclude` (the output directory: its manifest, build log and
    tokenizer.json are .json files) are left out of directories and globs."""
    if not specs:
        raise DataError("no --input given")
    skip = Path(exclude).resolve() if exclude is not None else None

    def wanted(p: Path) -> bool:
        return skip is None or not p.resolve().is_relative_to(skip)

    def inputs_of(spec: str, found: list[Path]) -> list[Path]:
        files = [p for p in found if wanted(p)]
        if found and not files:  # --input data --out data: not "no files"
            raise DataError(f"input {spec}: its files lie in the output directory {skip}, which is never read as "
                            "input: choose an --out outside it")
        return files

    inputs: list[Input] = []
    for spec in specs:
        if spec.startswith(HUB_PREFIX):
            if not spec[len(HUB_PREFIX):].split("@")[0].split(":")[0]:
                raise DataError(f"input {spec}: expected hf:NAME[:CONFIG][@SPLIT]")
            inputs.append(Input(spec, "hub"))
            continue
        path = Path(spec).expanduser()
        if glob.has_magic(spec):
            matches = inputs_of(spec, sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                                             if Path(p).is_file()))
            if not matches:
                raise DataError(f"input {spec}: the pattern matches no file")
            inputs += [_file_input(p, str(p)) for p in matches]
        elif path.is_dir():
            files = inputs_of(spec, sorted(p for p in path.rglob("*") if p.is_file() and _builder(p)
                                           and not any(part.startswith(".") for part in p.relative_to(path).parts)))
            if not files:
                raise DataError(f"input {spec}: directory has no {', '.join(BUILDERS)} files")
            inputs += [_file_input(p, str(p)) for p in files]
        elif path.is_file():
            inputs.append(_file_input(path, spec))
        else:
            raise DataError(f"input {spec}: no such file or directory "
                            f"(for a Hugging Face Hub dataset write {HUB_PREFIX}NAME[:CONFIG][@SPLIT])")
    seen = set()
    for inp in inputs:
        if inp.spec in seen:
            raise DataError(f"input {inp.spec} is given twice: its documents would be duplicated")
        seen.add(inp.spec)
    return inputs


def _json_mixed_types_option() -> bool:
    from datasets.packaged_modules.json.json import JsonConfig
    return "on_mixed_types" in JsonConfig.__dataclass_fields__


def _load(inp: Input, text_field: str, txt_doc: str, streaming: bool, mixed_types_as_json: bool = False):
    import datasets  # imported here: worker processes and --help should not pay for it

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # failures surface as DataError
    datasets.disable_progress_bars()
    if inp.builder == "hub":
        name, _, split = inp.spec[len(HUB_PREFIX):].partition("@")
        name, _, config = name.partition(":")
        return datasets.load_dataset(name, config or None, split=split or "train", streaming=streaming)
    kwargs = {}
    if inp.builder == "text":
        kwargs["sample_by"] = txt_doc
    elif inp.builder == "json" and not mixed_types_as_json and _json_mixed_types_option():
        # datasets' default ("use_json") turns a field whose type changes within a 10 MB chunk into the JSON
        # encoding of every value of that chunk: a non-string text would silently quote and escape its
        # neighbours. Let it raise instead; another field changing type is handled by reopening (iter_texts).
        # (Releases without the option raise on a type change anyway.)
        kwargs["on_mixed_types"] = None
    elif inp.builder == "parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(inp.spec).names
        if text_field not in columns:
            raise DataError(f"input {inp.spec}: no column {text_field!r} (columns: {', '.join(columns)}); "
                            "choose one with --text-field")
        kwargs["columns"] = [text_field]
    return datasets.load_dataset(inp.builder, data_files=[inp.spec], split="train", streaming=streaming, **kwargs)


def _open_binary(path: str):
    name = path.lower()
    if name.endswith(".gz"):
        import gzip
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        import bz2
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        import lzma
        return lzma.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard
        return zstandard.open(path, "rb")
    return open(path, "rb")


def _not_a_string(field: str, value) -> str | None:
    """What is wrong with a row's text `value`, if it is neither a string nor null."""
    if value is None or isinstance(value, str):
        return None
    return f"field {field!r} holds a value of type {type(value).__name__}, not a string"


def _locate_problem(inp: Input, field: str) -> str | None:
    """'line N: what is wrong' for the first bad line of a JSON-lines or text file, for an error message
    (datasets names rows within its chunks, not within the file); None if no line is found to be bad."""
    if inp.builder not in ("json", "text"):
        return None
    try:
        with _open_binary(inp.spec) as f:
            for n, line in enumerate(f, 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"line {n}: invalid UTF-8 (byte {e.start} of the line)"
                if inp.builder != "json" or not text.strip():
                    continue
                if n == 1 and text.lstrip("\ufeff").lstrip().startswith("["):
                    return _locate_in_array(f, line, field)  # one JSON array, not JSON lines
                try:
                    row = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    return f"line {n}: malformed JSON ({e.msg} at column {e.colno})"
                if not isinstance(row, dict):
                    return f"line {n}: a JSON {type(row).__name__}, not an object"
                if why := _not_a_string(field, row.get(field)):
                    return f"line {n}: {why}"
    except (OSError, EOFError, ValueError):  # unreadable or badly compressed: keep datasets' reason
        return None
    return None


def _json_array(inp: Input) -> bool:
    """Whether a json input is one JSON array (its first line opens one) rather than JSON lines."""
    try:
        with _open_binary(inp.spec) as f:
            return f.readline().lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"[")
    except (OSError, EOFError, ValueError):  # unreadable or badly compressed: datasets names it
        return False


def _locate_in_array(f, first: bytes, field: str) -> str | None:
    try:
        rows = json.loads((first + f.read()).decode("utf-8").lstrip("\ufeff"))
    except ValueError as e:
        return f"not valid JSON ({e})"
    for i, row in enumerate(rows if isinstance(rows, list) else []):
        if not isinstance(row, dict):
            return f"element {i} of the array: a JSON {type(row).__name__}, not an object"
        if why := _not_a_string(field, row.get(field)):
            return f"element {i} of the array: {why}"
    return None


def _mixed_other_field(e: Exception, field: str) -> bool:
    """Whether `e` is pyarrow refusing a JSON field other than the text field that changes type."""
    msg = str(e)
    return "changed from" in msg and "Column(/" in msg and (
        msg.split("Column(/", 1)[1].split(")", 1)[0].split("/")[0] != field)


def iter_texts(inp: Input, text_field: str = "text", txt_doc: str = "document", streaming: bool = True,
               start_row: int = 0) -> Iterator[str | None]:
    """The input's documents from row `start_row` on: the text field of each row, None if null."""
    if txt_doc not in TXT_DOC_MODES:
        raise DataError(f"txt_doc {txt_doc!r} is not one of {', '.join(TXT_DOC_MODES)}")
    field = "text" if inp.builder == "text" else text_field
    if inp.builder == "json" and _json_array(inp) and (where := _locate_problem(inp, field)):
        # datasets reads an array of strings or numbers as a column `text` of them: strings became documents (a
        # string per JSON line is refused), numbers an error naming a field the file does not have
        raise DataError(f"input {inp.spec}: {where}")
    try:
        ds = _load(inp, text_field, txt_doc, streaming)
        if start_row:
            ds = ds.skip(start_row)
        batches = iter(ds.iter(batch_size=_READ_ROWS))
    except DataError:
        raise
    except Exception as e:  # datasets/pyarrow/network errors: name the input, keep the reason
        # ...but a file without a single row has no documents; datasets' json builder says so by
        # StopIteration when streaming, "Instruction 'train' corresponds to no data" when not
        if isinstance(e, StopIteration) or "corresponds to no data" in str(e):
            return
        reason = e.__cause__ or e  # --no-streaming: datasets wraps the reader's error (what and which row)
        if inp.builder == "json" and _mixed_other_field(reason, field):
            yield from _iter_mixed_types_as_json(inp, text_field, streaming, start_row)
            return
        if where := _locate_problem(inp, field):
            raise DataError(f"input {inp.spec}: {where}") from e
        raise DataError(f"input {inp.spec}: cannot open as {inp.builder}: {type(reason).__name__}: {reason}") from e
    yield from _rows(inp, field, batches, start_row, text_field, streaming)


def _iter_mixed_types_as_json(inp: Input, text_field: str, streaming: bool, start_row: int) -> Iterator[str | None]:
    # In datasets' re-encoding mode a text field whose type changed further on would be encoded too, silently: a
    # scan of the file first makes a non-string text an error here as well.
    if where := _locate_problem(inp, text_field):
        raise DataError(f"input {inp.spec}: {where}")
    try:
        ds = _load(inp, text_field, "document", streaming, mixed_types_as_json=True)
        batches = iter((ds.skip(start_row) if start_row else ds).iter(batch_size=_READ_ROWS))
    except Exception as e:
        reason = e.__cause__ or e
        raise DataError(f"input {inp.spec}: cannot open as json: {type(reason).__name__}: {reason}") from e
    yield from _rows(inp, text_field, batches, start_row, text_field, streaming, reopened=True)


def _rows(inp: Input, field: str, batches, row: int, text_field: str, streaming: bool,
          reopened: bool = False) -> Iterator[str | None]:
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            if inp.builder == "json" and not reopened and _mixed_other_field(e, field):
                yield from _iter_mixed_types_as_json(inp, text_field, streaming, row)
                return
            if where := _locate_problem(inp, field):
                raise DataError(f"input {inp.spec}: {where}") from e
            raise DataError(f"input {inp.spec}: read failed after row {row}: {type(e).__name__}: {e}") from e
        if field not in batch:
            raise DataError(f"input {inp.spec}: row {row} has no field {field!r} "
                            f"(fields: {', '.join(batch) or 'none'}); choose one with --text-field")
        for text in batch[field]:
            if why := _not_a_string(field, text):
                raise DataError(f"input {inp.spec}: row {row}: {why}")
            row += 1
            yield text
