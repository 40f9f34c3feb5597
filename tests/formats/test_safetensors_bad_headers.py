"""Lying, damaged and hostile safetensors headers: one clear FileFormatError each, no crash, no huge allocation."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from formats_helpers import write_raw

from lorakit.errors import FileFormatError, InputError
from lorakit.formats.safetensors_io import SafetensorsReader, load_any, read_file, write_file

torch.set_num_threads(1)  # small ops are far slower with two threads on the 2-core test machines


def _entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}


def _offsets(begin: object, end: object) -> list:
    return [begin, end]


EIGHT = bytes(8)

# (id, builder(path) -> None, fragment the message must contain)
CASES: list[tuple[str, Callable[[Path], object], str]] = [
    ("empty file", lambda p: p.write_bytes(b""), "too short"),
    ("shorter than 8 bytes", lambda p: p.write_bytes(b"\x10\x00\x00"), "too short"),
    ("header length zero", lambda p: write_raw(p, b"", length=0), "too small"),
    ("header length past end", lambda p: write_raw(p, b"{}", length=1000), "runs past the end"),
    ("huge header length", lambda p: write_raw(p, b"{}", length=2**63), "limit"),
    ("header just over limit", lambda p: write_raw(p, b"{}", length=100_000_001), "limit"),
    ("truncated header", lambda p: p.write_bytes((50).to_bytes(8, "little") + b'{"a":'), "runs past the end"),
    ("not utf-8", lambda p: write_raw(p, b'{"a\xff":1}'), "UTF-8"),
    ("not json", lambda p: write_raw(p, b'{"a":'), "not valid JSON"),
    ("json nan garbage", lambda p: write_raw(p, b"{]"), "not valid JSON"),
    ("deeply nested json", lambda p: write_raw(p, b"[" * 200_000), "not valid JSON"),
    ("json array", lambda p: write_raw(p, [1, 2]), "not an object"),
    ("json string", lambda p: write_raw(p, "x"), "not an object"),
    ("duplicate key", lambda p: write_raw(p, b'{"a":{},"a":{}}'), "twice"),
    ("metadata not object", lambda p: write_raw(p, {"__metadata__": ["a"]}), "__metadata__"),
    ("metadata null", lambda p: write_raw(p, {"__metadata__": None}), "__metadata__"),
    ("metadata int value", lambda p: write_raw(p, {"__metadata__": {"ss_steps": 100}}), "'ss_steps'"),
    ("metadata nested value", lambda p: write_raw(p, {"__metadata__": {"tags": {"a": 1}}}), "'tags'"),
    ("entry not object", lambda p: write_raw(p, {"w": 5}), "'w'"),
    ("unknown dtype", lambda p: write_raw(p, {"w": _entry("F7")}, EIGHT), "unknown dtype"),
    ("missing dtype", lambda p: write_raw(p, {"w": {"shape": [2], "data_offsets": [0, 8]}}, EIGHT), "no dtype"),
    ("lower-case dtype", lambda p: write_raw(p, {"w": _entry("f32")}, EIGHT), "unknown dtype"),
    ("negative shape", lambda p: write_raw(p, {"w": _entry(shape=[-2])}, EIGHT), "shape"),
    ("float shape", lambda p: write_raw(p, {"w": _entry(shape=[2.0])}, EIGHT), "shape"),
    ("bool shape", lambda p: write_raw(p, {"w": _entry(shape=[True, 2])}, EIGHT), "shape"),
    ("shape not list", lambda p: write_raw(p, {"w": _entry(shape="2")}, EIGHT), "shape"),
    ("missing shape", lambda p: write_raw(p, {"w": {"dtype": "F32", "data_offsets": [0, 8]}}, EIGHT), "shape"),
    ("offsets one value", lambda p: write_raw(p, {"w": _entry(offsets=[8])}, EIGHT), "data_offsets"),
    ("offsets three values", lambda p: write_raw(p, {"w": _entry(offsets=[0, 4, 8])}, EIGHT), "data_offsets"),
    ("negative offset", lambda p: write_raw(p, {"w": _entry(offsets=_offsets(-8, 0))}, EIGHT), "data_offsets"),
    ("float offset", lambda p: write_raw(p, {"w": _entry(offsets=_offsets(0, 8.0))}, EIGHT), "data_offsets"),
    ("begin after end", lambda p: write_raw(p, {"w": _entry(offsets=_offsets(8, 0))}, EIGHT), "begin after end"),
    ("end past data", lambda p: write_raw(p, {"w": _entry(offsets=_offsets(0, 8))}, bytes(4)), "has only 4 bytes"),
    (
        "huge end past data",
        lambda p: write_raw(p, {"w": _entry(shape=[2**60], offsets=_offsets(0, 2**62))}, EIGHT),
        "has only 8 bytes",
    ),
    ("byte count mismatch", lambda p: write_raw(p, {"w": _entry(shape=[3])}, EIGHT), "needs 12"),
    (
        "huge shape, small span",
        lambda p: write_raw(p, {"w": _entry(shape=[10**12, 10**12])}, EIGHT),
        "needs 4000000000000000000000000",
    ),
    (
        "overlapping tensors",
        lambda p: write_raw(p, {"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[4, 12])}, bytes(12)),
        "overlap",
    ),
    (
        "same span twice",
        lambda p: write_raw(p, {"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[0, 8])}, EIGHT),
        "overlap",
    ),
]


@pytest.mark.parametrize("builder,fragment", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_header_is_one_clear_error(tmp_path: Path, builder: Callable[[Path], object], fragment: str) -> None:
    path = tmp_path / "bad_file.safetensors"
    builder(path)
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError) as caught:
            SafetensorsReader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert "bad_file.safetensors" in message
    assert fragment in message
    assert "\n" not in message and len(message) < 400
    assert ";" in message  # "<problem>; <what to do>"
    # Nothing sized from the header's claims: the only buffers are the (small) header itself.
    assert peak < 16 * 2**20


def test_empty_tensor_may_share_an_offset(tmp_path: Path) -> None:
    header = {"e": _entry(shape=[0], offsets=[0, 0]), "w": _entry(offsets=[0, 8])}
    tensors, _ = read_file(write_raw(tmp_path / "ok.safetensors", header, EIGHT))
    assert tensors["e"].shape == (0,) and tensors["w"].shape == (2,)


def test_nul_padding_is_accepted(tmp_path: Path) -> None:
    raw = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    tensors, _ = read_file(write_raw(tmp_path / "nul.safetensors", raw + b"\x00" * 5, EIGHT))
    assert tensors["w"].tolist() == [0.0, 0.0]


def test_file_shrinking_after_open(tmp_path: Path) -> None:
    path = tmp_path / "shrink.safetensors"
    write_file(path, {"w": torch.ones(1000)})
    with SafetensorsReader(path) as reader:
        with open(path, "r+b") as handle:
            handle.truncate(reader.data_offset + 100)
        with pytest.raises(FileFormatError, match="shrink.safetensors.*cut short"):
            reader.get("w")


def test_key_in_message_is_one_line_and_short(tmp_path: Path) -> None:
    key = "evil\nkey" + "x" * 10_000
    path = write_raw(tmp_path / "k.safetensors", {key: _entry("F7")}, EIGHT)
    with pytest.raises(FileFormatError) as caught:
        SafetensorsReader(path)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    assert "evil\\nkey" in str(caught.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        SafetensorsReader(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="is a folder"):
        SafetensorsReader(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        load_any(tmp_path / "nope.safetensors")
