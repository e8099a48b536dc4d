"""Where a long document may be cut so that sentencepiece, encoding the pieces one by one, gives exactly
the tokens of the whole document.

Why cut: sentencepiece holds ~45 bytes per character of the string it encodes (normalized copy and
offsets, BPE symbols and merge queue, a proto per token), so one 1 GB document would need ~45 GB.

Why a cut between characters a|b is exact, for the models where `joinable_pairs` returns a set:
  1. Normalization is character by character: no normalization rule (identity), no dummy prefix, no
     removal of extra whitespace; so normalize(A + B) = normalize(A) + normalize(B) (' ' -> '▁' is all;
     a user-defined piece, kept whole, cannot span the cut by 2).
  2. No piece holds a and b side by side (' ' and '▁', one once normalized, count as each other).
     BPE starts from characters and user-defined pieces and only ever merges into pieces, so no symbol
     spans the cut, and a merge on one side never changes a symbol of the other. BPE repeatedly merges
     the valid pair of best (score, then leftmost index): A's merges are taken in the order A alone
     gives, and B's indexes all shift by the same amount, which keeps their order. Scores are only
     compared, never summed (unigram's Viterbi sums them, and a float sum's rounding depends on what
     precedes the cut: unigram models are not cut).
  3. Tokens depend on their own symbol only: byte fallback on (without it neighbouring unknown pieces
     merge into one <unk>, across a cut too) and no UNUSED pieces (resegmented through a table that the
     whole input fills).
The project's tokenizers (train_tokenizer.py: bpe, identity, split by whitespace, trained on single lines)
can be cut before every word's space and at every line break.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import sentencepiece as spm

_BPE = 2  # TrainerSpec.ModelType in sentencepiece_model.proto
_SPACE = "\u2581"  # what sentencepiece escapes ' ' to


def joinable_pairs(sp: spm.SentencePieceProcessor) -> frozenset[str] | None:
    """Every two characters that some piece holds side by side, in every spelling of the space;
    None if the model is not one where the cut argument above holds (never cut its documents)."""
    if not _cuttable(sp.serialized_model_proto()):
        return None
    pairs = set()
    for i in range(sp.get_piece_size()):
        if sp.is_unused(i):
            return None
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)):  # those never match text
            piece = sp.id_to_piece(i)
            pairs.update(spelling for a, b in itertools.pairwise(piece) for spelling in _spellings(a, b))
    return frozenset(pairs)


def pieces(text: str, joinable: frozenset[str] | None, size: int) -> Iterator[str]:
    """`text` in consecutive pieces, each cut at the first safe place at least `size` characters into it
    (a piece is longer where there is none; the whole text when `joinable` is None)."""
    start = 0
    while joinable is not None and len(text) - start > size:
        cut = next((i for i in range(start + size, len(text)) if text[i - 1:i + 1] not in joinable), None)
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _spellings(a: str, b: str) -> list[str]:
    def same(c: str) -> str:
        return " " + _SPACE if c in (" ", _SPACE) else c

    return [x + y for x in same(a) for y in same(b)]


def _cuttable(model: bytes) -> bool:
    """Whether the model is BPE with byte fallback and character-by-character normalization (1 and 3 above)."""
    fields = dict(_fields(model))
    trainer, normalizer = dict(_fields(fields.get(2, b""))), dict(_fields(fields.get(3, b"")))
    return (trainer.get(3, 1) == _BPE and trainer.get(35, 0) == 1  # model_type, byte_fallback
            and not normalizer.get(2, b"")  # precompiled_charsmap: the normalization rule
            and normalizer.get(3, 1) == 0 and normalizer.get(4, 1) == 0)  # add_dummy_prefix, remove_extra_whitespaces


def _fields(message: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message: varints as int, the rest as bytes. Read by hand:
    protobuf is no dependency of ours, and sentencepiece's generated module refuses any protobuf older than
    the one that generated it (7.36 for sentencepiece 0.2.3)."""
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        else:
            if wire == 2:
                n, pos = _varint(message, pos)
            elif wire in (1, 5):
                n = 8 if wire == 1 else 4
            else:
                raise ValueError(f"protobuf wire type {wire} (groups) in a sentencepiece model")
            value, pos = message[pos:pos + n], pos + n
        yield key >> 3, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
