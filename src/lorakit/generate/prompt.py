"""Prompt syntax for LoRAs, as AUTOMATIC1111 writes it: ``<lora:name:w>`` inside the prompt text.

Forms (numbers are floats, may be negative):

- ``<lora:name>``: weight 1 on the denoiser and the text encoders;
- ``<lora:name:w>``: weight ``w`` on both;
- ``<lora:name:te:unet>``: A1111's order, text-encoder weight first, then the denoiser's;
- named options after the name, in any order: ``te=0.5``, ``unet=0.8`` and ``lbw=SPEC`` (block weights as the LoRA
  Block Weight extension writes them: a preset such as ``MIDD`` or comma-separated numbers, see
  ``lorakit.ops.blocks``).

Tags are removed from the text that reaches the text encoder. Names resolve to ``.safetensors`` files under a LoRA
folder by file stem, exactly first, then ignoring case.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ConfigError, InputError

__all__ = ["LoraRef", "format_lora_tag", "parse_prompt", "resolve_lora"]

_TAG = re.compile(r"<lora:([^>]*)>")
_OPEN = re.compile(r"<lora:", re.IGNORECASE)
_NAMED = ("te", "unet", "lbw")


@dataclass(frozen=True)
class LoraRef:
    """One ``<lora:...>`` tag.

    Attributes:
        name: the LoRA's name (a file stem under the LoRA folder).
        weight: strength on the denoiser.
        text_encoder_weight: strength on the text encoders.
        lbw: block-weight spec, or None.
        tag: the tag as written.
    """

    name: str
    weight: float = 1.0
    text_encoder_weight: float = 1.0
    lbw: str | None = None
    tag: str = ""


def _number(text: str, tag: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"prompt: {tag}: {what} {text!r} is not a number; write e.g. <lora:name:0.8>") from None


def _parse_tag(body: str, tag: str) -> LoraRef:
    fields = body.split(":")
    name = fields[0].strip()
    if not name:
        raise ConfigError(f"prompt: {tag}: the LoRA name is empty; write <lora:name:weight>")
    positional: list[float] = []
    named: dict[str, str] = {}
    for field in fields[1:]:
        key, eq, value = field.partition("=")
        if eq:
            key = key.strip().lower()
            if key not in _NAMED:
                raise ConfigError(f"prompt: {tag}: unknown option {key!r}; lorakit knows {', '.join(_NAMED)}")
            named[key] = value.strip()
        elif named:
            raise ConfigError(f"prompt: {tag}: a weight after a named option; put te/unet/lbw= last")
        else:
            positional.append(_number(field.strip(), tag, "weight"))
    if len(positional) > 2:
        raise ConfigError(f"prompt: {tag}: too many weights; use <lora:name:w> or <lora:name:te:unet>")
    te = positional[0] if positional else 1.0
    unet = positional[1] if len(positional) > 1 else te
    te = _number(named["te"], tag, "te") if "te" in named else te
    unet = _number(named["unet"], tag, "unet") if "unet" in named else unet
    lbw = named.get("lbw") or None
    return LoraRef(name=name, weight=unet, text_encoder_weight=te, lbw=lbw, tag=tag)


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """Split a prompt into the text for the text encoder and its LoRA tags.

    Args:
        prompt: e.g. ``"a cat <lora:ink:0.8> <lora:film:0.4:lbw=MIDD>"``.

    Returns:
        ``(text, refs)``: the prompt without tags (spaces around removed tags collapsed) and the tags in order.

    Raises:
        ConfigError: an unclosed tag, an empty name, a weight that is not a number, an unknown option, or the same
            LoRA twice (one line naming the tag).
    """
    refs = [_parse_tag(m.group(1), m.group(0)) for m in _TAG.finditer(prompt)]
    rest = _TAG.sub(" ", prompt)
    stray = _OPEN.search(rest)
    if stray is not None:
        snippet = rest[stray.start() : stray.start() + 30]
        raise ConfigError(f"prompt: unclosed LoRA tag at {snippet!r}; close it with '>' as in <lora:name:0.8>")
    seen: set[str] = set()
    for ref in refs:
        if ref.name in seen:
            raise ConfigError(f"prompt: LoRA {ref.name!r} appears twice; keep one tag per LoRA")
        seen.add(ref.name)
    text = re.sub(r"\s+", " ", rest).strip()
    text = re.sub(r"\s+([,.])", r"\1", text)
    return text, refs


def _number_text(value: float) -> str:
    return f"{value:g}"


def format_lora_tag(name: str, weight: float, text_encoder_weight: float | None = None, lbw: str | None = None) -> str:
    """The tag A1111 would write: ``<lora:name:w>``, or ``<lora:name:te:unet>`` when the two weights differ."""
    te = weight if text_encoder_weight is None else text_encoder_weight
    body = f"{name}:{_number_text(te)}"
    if te != weight:
        body += f":{_number_text(weight)}"
    if lbw:
        body += f":lbw={lbw}"
    return f"<lora:{body}>"


def resolve_lora(name: str, lora_dir: str | Path | None) -> Path:
    """Find the file of a LoRA name: ``<lora_dir>/**/<name>.safetensors``, exact stem first, then ignoring case.

    Raises:
        InputError: no folder given, no such name (the message lists the closest names), or several files that
            match ignoring case.
    """
    if lora_dir is None:
        raise InputError(f"prompt: <lora:{name}:...> needs a LoRA folder to look in; pass --lora-dir DIR")
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; pass --lora-dir with the folder of your LoRA files")
    files = sorted(folder.rglob("*.safetensors"))
    exact = [f for f in files if f.stem == name]
    if len(exact) == 1:
        return exact[0]
    loose = exact or [f for f in files if f.stem.lower() == name.lower()]
    if len(loose) == 1:
        return loose[0]
    if len(loose) > 1:
        listed = ", ".join(str(f.relative_to(folder)) for f in loose)
        raise InputError(f"prompt: LoRA {name!r} matches several files in {folder} ({listed}); rename one")
    close = difflib.get_close_matches(name, sorted({f.stem for f in files}), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"it holds {len(files)} .safetensors files"
    raise InputError(f"prompt: no LoRA named {name!r} in {folder}; {hint}")
