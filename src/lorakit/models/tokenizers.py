"""Tokenizers made offline in code, for the tiny pipelines (no download, no files needed).

A CLIP tokenizer is a byte-level BPE: every one of the 256 byte characters (in GPT-2's printable mapping) and its
word-final ``</w>`` form are in the vocabulary, plus merges for a small fixed word list so that common prompt words
are single tokens, plus ``<|startoftext|>`` / ``<|endoftext|>``. A T5 tokenizer is a SentencePiece-style Unigram over
the lowercase letters, digits and the same word list.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["CLIP_MAX_LENGTH", "clip_tokenizer", "t5_tokenizer"]

CLIP_MAX_LENGTH = 77
"""Sequence length of the CLIP text encoders (the real models' 77; prompts pad to it)."""

_WORDS = (
    "a an the of and with in on photo picture painting drawing portrait style cat dog man woman girl boy red green "
    "blue yellow black white circle square triangle cross star shape background landscape city tree house car"
).split()


@functools.cache
def _byte_chars() -> tuple[str, ...]:
    """The 256 printable characters that byte-level BPE uses for the bytes 0..255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            # bytes without a printable glyph go to code points above 255, as in GPT-2 and CLIP
            chars[b] = 256 + extra
            extra += 1
    return tuple(chr(chars[b]) for b in range(256))


@functools.cache
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    for c in _byte_chars():
        vocab[c] = len(vocab)
    for c in _byte_chars():
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        # merge left to right: every intermediate token enters the vocabulary, so any merge order stays valid
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            joined = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(joined, len(vocab))
            pieces = [joined, *pieces[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> Any:
    """A CLIP byte-level BPE tokenizer built in memory.

    Args:
        max_length: ``model_max_length`` (set explicitly: transformers' default of ~1e30 breaks padding).

    Returns:
        A ``transformers.CLIPTokenizer``; ``len(tok)`` is the vocabulary size to give the text encoder.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


def t5_tokenizer(max_length: int = 512) -> Any:
    """A T5 (Unigram) tokenizer built in memory: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2.

    Args:
        max_length: ``model_max_length``.

    Returns:
        A ``transformers.T5Tokenizer`` (tokenizers-backed in transformers 5).
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!?-'"]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
