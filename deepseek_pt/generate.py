"""python -m deepseek_pt.generate --checkpoint CKPT --prompt TEXT [--suffix TEXT] | --interactive: sample from a model.

CKPT is a training run directory (any world size), one of its checkpoints, an export or an HF
DeepseekV3 directory. Decoding runs MLA's absorbed path against the compressed cache, which holds
only the normalised latent and the shared rotary key per token and layer; --no-cache recomputes the
whole prefix every step instead. Greedy output (--temperature 0) is the same either way in fp32 (in
bf16 the two paths round differently and may part after some tokens). With --suffix the model fills in
the middle between --prompt and the suffix, prompted as fill-in-the-middle training documents are
written (build_shards.py --fim-rate): BEGIN prompt HOLE suffix END, the middle ending at EOS.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Iterator

import sentencepiece as spm
import torch

from .data.format import FIM_SYMBOLS, DataError, fim_ids
from .interop.checkpoints import checkpoint_tokenizer, load_checkpoint
from .interop.cli import DTYPE_CHOICES, UsageError, default_device, device_arg, out_of_memory_line, run_cli
from .model import Transformer
from .model.counting import kv_cache_bytes_per_token

MEMORY_FIXES = ("a shorter prompt or --max-new-tokens (the cache and the attention grow with both); --dtype "
                "bfloat16 where the weights load in float32; or --device cpu")
"""What a CUDA out-of-memory error's line offers."""


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] with everything outside the top-k and outside the smallest set of tokens whose
    probability reaches top_p set to -inf (0 / 1.0 disable either)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best one always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax at temperature 0, else a draw from the filtered softmax."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted to a max of 0 that stays 0: a tiny temperature (even one below the dtype's range) then
    # sends the rest to -inf, never to nan (inf - inf in the softmax, or 0 / 0).
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    logits = torch.where(shifted == 0, 0.0, shifted / temperature)
    probs = filter_logits(logits, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                    use_cache: bool = True, stop_ids: tuple[int, ...] = (),
                    vocab_size: int | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens sampled continuations of `prompt`, stopping after a stop id. Only
    ids below vocab_size are drawn (a model's vocabulary is often padded beyond its tokenizer's)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    device = model.embed_tokens.weight.device
    ids = torch.tensor([prompt], device=device)
    dtype = model.embed_tokens.weight.dtype
    caches = model.new_caches(1, len(prompt) + max_new_tokens, dtype, device) if use_cache else None
    logits = model(ids, caches=caches)[:, -1]
    for step in range(max_new_tokens):
        token = sample(logits[:, :vocab_size], temperature, top_k, top_p, generator)
        yield token.item()
        if token.item() in stop_ids or step == max_new_tokens - 1:
            return
        ids = torch.cat([ids, token[:, None]], dim=1)
        logits = (model(ids[:, -1:], caches=caches, start_pos=ids.shape[1] - 1) if use_cache else model(ids))[:, -1]


def cache_report(model: Transformer) -> str:
    """Decode-cache bytes per token against what full multi-head K/V would take, at the model's dtype."""
    m, a = model.config, model.config.attention
    width = model.embed_tokens.weight.element_size()
    sizes = kv_cache_bytes_per_token(m, width)
    mla, mha = sizes["kv_cache_bytes_per_token"], sizes["mha_kv_cache_bytes_per_token"]
    return (f"KV cache: {mla:,} B/token = {m.n_layers} layers x (latent {a.kv_lora_rank} + rotary key "
            f"{a.qk_rope_head_dim}) x {width} B; full multi-head K/V would take {mha:,} B/token "
            f"({mha / mla:.1f}x)")


def prompt_ids(sp: spm.SentencePieceProcessor, text: str, prefix: str,
               fim: tuple[str, tuple[int, int, int]] | None = None) -> list[int]:
    """Token ids of `text` after a document-start marker: `bos`, `eos` (what precedes a document in
    eos-separated training data) or `none`. With `fim` (suffix text, the BEGIN, HOLE and END ids): a
    fill-in-the-middle prompt, BEGIN text HOLE suffix END, each part encoded alone as the training data's were."""
    marker = {"bos": sp.bos_id(), "eos": sp.eos_id(), "none": -1}[prefix]
    head = [marker] if marker >= 0 else []
    if fim is None:
        return head + sp.encode(text)
    suffix, (begin, hole, end) = fim
    return [*head, begin, *sp.encode(text), hole, *sp.encode(suffix), end]


def _utf8_text(text: str, where: str) -> str:
    """`text` if it is UTF-8: Python stands for other bytes (of argv, or of a C-locale stdin) with lone
    surrogates, which sentencepiece cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{where}: not UTF-8 text (an undecodable byte at character {e.start})") from None
    return text


def _default_prefix(doc_boundary: str | None, sp: spm.SentencePieceProcessor) -> str:
    if doc_boundary == "eos":
        return "eos"
    return "bos" if doc_boundary == "bos_eos" or sp.bos_id() >= 0 else "none"


def _complete(model, sp, text: str, where: str, args, generator, fim=None) -> None:
    """Write `text`, then what the model generates after it (with `fim`, prompt_ids', the middle, then the suffix)."""
    ids = prompt_ids(sp, text, args.prefix, fim)
    room = model.config.max_seq_len - len(ids)
    if not ids or room <= 0:
        raise UsageError(f"{where}: the prompt has {len(ids)} tokens; it needs 1 to {model.config.max_seq_len - 1} "
                         f"(model.max_seq_len {model.config.max_seq_len})")
    if args.max_new_tokens > room:
        print(f"note: max-new-tokens {args.max_new_tokens} capped at {room} (model.max_seq_len "
              f"{model.config.max_seq_len})", file=sys.stderr)
    stop = () if args.ignore_eos or sp.eos_id() < 0 else (sp.eos_id(),)
    out = sys.stdout
    out.write(text)
    # Decode prompt and continuation together: a piece's leading space may depend on what precedes it.
    prompt_text = sp.decode(ids)
    new, shown, start = [], "", time.perf_counter()
    for token in generate_tokens(model, ids, min(args.max_new_tokens, room), args.temperature, args.top_k,
                                 args.top_p, generator, not args.no_cache, stop, sp.vocab_size()):
        new.append(token)
        text_now = sp.decode(ids + new)[len(prompt_text):]
        if not text_now.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text_now[len(shown):])
            out.flush()
            shown = text_now
    out.write(sp.decode(ids + new)[len(prompt_text) + len(shown):] + (fim[0] if fim else "") + "\n")
    seconds = time.perf_counter() - start
    print(f"[{len(ids)} prompt + {len(new)} new tokens in {seconds:.2f}s: {len(new) / seconds:.1f} tokens/s, "
          f"{'no cache' if args.no_cache else 'compressed cache'}]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepseek_pt.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, DeepSpeed checkpoint, export dir or HF dir")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue")
    what.add_argument("--interactive", action="store_true", help="read prompts from stdin until EOF")
    p.add_argument("--suffix", help="fill in the middle: generate what goes between --prompt and this text (a model "
                   "trained on fill-in-the-middle documents: build_shards.py --fim-rate)")
    p.add_argument("--fim-symbols", nargs=3, default=list(FIM_SYMBOLS), metavar=("BEGIN", "HOLE", "END"),
                   help="the tokenizer's fill-in-the-middle pieces, as the shards were built with (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-document token")
    p.add_argument("--prefix", choices=["auto", "bos", "eos", "none"], default="auto",
                   help="document-start token before the prompt (auto: what the training data used)")
    p.add_argument("--tokenizer", help="sentencepiece model (default: the checkpoint's tokenizer.model); refused "
                   "unless it is the tokenizer the model was trained with, where the checkpoint records that")
    p.add_argument("--device", type=device_arg, default=default_device())
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: the checkpoint's")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or not args.temperature >= 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    if args.seed is not None and not -2**63 <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        parser.error(f"--seed {args.seed} is outside [-2**63, 2**64)")
    if args.suffix is not None and args.prompt is None:
        parser.error("--suffix fills in after --prompt: give both")

    def run() -> None:
        prompt = None if args.prompt is None else _utf8_text(args.prompt, "--prompt")  # before the (slow) load
        suffix = None if args.suffix is None else _utf8_text(args.suffix, "--suffix")
        ckpt = load_checkpoint(args.checkpoint, args.device, DTYPE_CHOICES.get(args.dtype))
        sp = checkpoint_tokenizer(ckpt, args.checkpoint, args.tokenizer)
        if sp.vocab_size() > ckpt.model.config.vocab_size:
            raise UsageError(f"tokenizer has {sp.vocab_size()} pieces, the model only {ckpt.model.config.vocab_size}")
        if args.prefix == "auto":
            args.prefix = _default_prefix(ckpt.doc_boundary, sp)
        generator = torch.Generator(args.device)
        generator.manual_seed(args.seed if args.seed is not None else torch.seed())
        print(cache_report(ckpt.model) if not args.no_cache else "no cache: the prefix is recomputed every step",
              file=sys.stderr)
        fim = None
        if suffix is not None:
            try:
                fim = suffix, fim_ids(sp, tuple(args.fim_symbols), "tokenizer")
            except DataError as e:
                raise UsageError(f"--suffix: {e}") from None
        if prompt is not None:
            _complete(ckpt.model, sp, prompt, "--prompt", args, generator, fim)
            return
        at_terminal = sys.stdin.isatty()
        for where, text in _read_prompts():
            try:
                _complete(ckpt.model, sp, _utf8_text(text, where), where, args, generator)
            except (UsageError, torch.OutOfMemoryError) as e:
                if not at_terminal:  # piped prompts (a script): the first bad one ends the run, exit 2
                    raise
                # typed: the next prompt, the model still loaded (a long prompt's cache freed)
                print(out_of_memory_line(e, MEMORY_FIXES) if isinstance(e, torch.OutOfMemoryError) else f"error: {e}",
                      file=sys.stderr)

    return run_cli(run, MEMORY_FIXES)


def _read_prompts() -> Iterator[tuple[str, str]]:
    """(where, text) of each line of stdin: an error names the line."""
    for line in itertools.count(1):
        try:
            text = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        except UnicodeDecodeError as e:  # a stdin that decodes strictly (a UTF-8 locale), ahead by a buffer: no line
            raise UsageError(f"stdin: not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason})") from None
        yield f"stdin line {line}", text


if __name__ == "__main__":
    sys.exit(main())
