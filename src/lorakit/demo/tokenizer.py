"""A CLIP-style byte-level BPE vocabulary learnt from the procedural captions: ``vocab.json`` + ``merges.txt``.

The files follow CLIP's tokenizer: words are lower-cased, split by CLIP's pattern, mapped byte by byte to printable
characters, and the last character of a word carries the ``</w>`` end-of-word suffix. The vocabulary holds every byte
character with and without the suffix, so any word can be spelled (a new trigger word falls back to small pieces),
then one token per merge, then the two special tokens. Merges are learnt by plain BPE (merge the most frequent pair,
ties broken by the pair itself, so the result is deterministic).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

__all__ = ["BOS", "EOS", "bytes_to_unicode", "learn_bpe", "write_tokenizer_files"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map from the 256 byte values to printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def _spell(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_map[b] for b in word.encode("utf-8")]
    chars[-1] += "</w>"
    return tuple(chars)


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_bpe(texts: list[str], max_merges: int = 2000) -> list[tuple[str, str]]:
    """Learn BPE merges from ``texts`` until every word is one token (or ``max_merges``)."""
    byte_map = bytes_to_unicode()
    counts = Counter(w for t in texts for w in _WORD.findall(t.lower()))
    words = {_spell(w, byte_map): c for w, c in counts.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, c in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {_merge(w, best): c for w, c in words.items()}
    return merges


def write_tokenizer_files(folder: Path, texts: list[str]) -> dict[str, int]:
    """Write ``vocab.json`` and ``merges.txt`` learnt from ``texts`` into ``folder``.

    Returns:
        ``{"vocab_size", "bos_token_id", "eos_token_id"}`` for the text encoder's config.
    """
    merges = learn_bpe(texts)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS]}
