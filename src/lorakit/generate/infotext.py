"""A1111 "infotext": the generation parameters that a PNG carries in its ``parameters`` text chunk.

    a photo of a cat <lora:ink:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: sd15,
    Lora hashes: "ink: 3c0a2f41b9d7", Version: lorakit 0.1.0

(the last line is one line). Values with a comma, colon or quote are JSON-quoted, as A1111 does, so Civitai and
A1111's "PNG Info" read ``Lora hashes`` (``name: first 12 hex of the sha256 of the safetensors data``, A1111's LoRA
short hash) and the ``<lora:name:w>`` tags in the prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import FileFormatError, InputError
from lorakit.formats.safetensors_writer import atomic_file

__all__ = ["Infotext", "format_infotext", "lora_short_hash", "parse_infotext", "read_png_infotext", "write_png"]

_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


@dataclass
class Infotext:
    """Generation parameters as A1111 writes them.

    Attributes:
        prompt: the prompt as the user wrote it (LoRA tags included).
        negative: the negative prompt ("" for none).
        params: ``Steps``, ``Sampler``, ``CFG scale``, ``Seed``, ``Size``, ``Model hash``, ``Model``, ``Lora hashes``
            and others, in order, as strings.
    """

    prompt: str
    negative: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def lora_hashes(self) -> dict[str, str]:
        """``Lora hashes`` as name -> short hash."""
        text = self.params.get("Lora hashes", "")
        pairs = (item.split(":", 1) for item in text.split(",") if ":" in item)
        return {name.strip(): value.strip() for name, value in pairs}


def _quote(value: str) -> str:
    # A1111's rule: quote only what would break the "key: value, ..." line
    if "," not in value and ":" not in value and '"' not in value and "\n" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def format_infotext(info: Infotext) -> str:
    """The ``parameters`` text: prompt, ``Negative prompt:`` line (when any), then the parameter line."""
    lines = [info.prompt]
    if info.negative:
        lines.append(f"{_NEGATIVE} {info.negative}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in info.params.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> Infotext:
    """Parse a ``parameters`` text (A1111's, or lorakit's) back into its parts.

    The last line is the parameter line when it parses as ``key: value`` pairs (at least three); everything before
    the ``Negative prompt:`` line is the prompt.
    """
    lines = text.strip("\n").split("\n")
    params: dict[str, str] = {}
    last = lines[-1]
    found = _PARAM.findall(last)
    if len(found) >= 3:
        params = {k.strip(): _unquote(v.strip()) for k, v in found}
        lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if line.startswith(_NEGATIVE) and not negative_lines:
            negative_lines.append(line[len(_NEGATIVE) :].strip())
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    return Infotext("\n".join(prompt_lines), "\n".join(negative_lines), params)


def lora_short_hash(path: str | Path) -> str:
    """A1111's LoRA short hash: the first 12 lower-case hex digits of the sha256 of the safetensors data section
    (Civitai's AutoV3 prefix)."""
    from lorakit.formats.hashes import auto_v3

    full = auto_v3(path)
    if full is None:
        raise FileFormatError(f"{path}: is not a safetensors file, so it has no LoRA hash; convert it first")
    return full[:12].lower()


def lora_hashes_value(hashes: Mapping[str, str]) -> str:
    """The ``Lora hashes`` value: ``name: hash, name: hash``."""
    return ", ".join(f"{name}: {value}" for name, value in hashes.items())


def write_png(image, path: str | Path, infotext: str) -> Path:
    """Save a PIL image as PNG with the ``parameters`` text chunk, atomically (temp file in the folder, rename)."""
    from PIL.PngImagePlugin import PngInfo

    target = Path(path)
    if not target.parent.is_dir():
        raise InputError(f"{target}: its folder does not exist; create it or choose another -o")
    chunk = PngInfo()
    chunk.add_text("parameters", infotext)
    with atomic_file(target) as (file, _):
        image.save(file, format="PNG", pnginfo=chunk)
    return target


def read_png_infotext(path: str | Path) -> Infotext:
    """The infotext of a PNG written by A1111 or lorakit.

    Raises:
        FileFormatError: the PNG carries no ``parameters`` text.
    """
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("parameters")
    if text is None:
        raise FileFormatError(f"{path}: carries no 'parameters' text chunk (no generation infotext)")
    return parse_infotext(text)
