"""Hashes against independent oracles (hashlib, zlib, and kohya's definitions written out here)."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import pytest
import torch
from formats_helpers import random_tensor
from safetensors.torch import save, save_file

from lorakit.errors import FileFormatError
from lorakit.formats import hashes
from lorakit.formats.safetensors_io import write_file

torch.set_num_threads(1)  # small ops are far slower with two threads on the 2-core test machines

MIB = 1 << 20


def _random_bytes(size: int, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8).numpy().tobytes()


def _data_section(raw: bytes) -> bytes:
    # Read the header length by hand, independently of lorakit.
    return raw[8 + int.from_bytes(raw[:8], "little") :]


def test_hello_world(tmp_path: Path) -> None:
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello world")
    digest = hashlib.sha256(b"hello world").hexdigest().upper()
    assert hashes.sha256(path) == digest
    assert hashes.auto_v2(path) == digest[:10]
    assert hashes.crc32(path) == "85114A0D"
    assert zlib.crc32(b"hello world") == 0x0D4A1185  # the usual form, bytes reversed by Civitai
    assert hashes.auto_v1(path) is None
    assert hashes.a1111_model_hash(path) == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"
    # The first 8 bytes read as a length run far past the end: not a safetensors file.
    assert hashes.auto_v3(path) is None
    found = hashes.file_hashes(path)
    assert (found.sha256, found.auto_v2, found.crc32, found.auto_v1, found.auto_v3) == (
        digest,
        digest[:10],
        "85114A0D",
        None,
        None,
    )
    with pytest.raises(FileFormatError):
        hashes.sshs_model_hash(path)


@pytest.mark.parametrize("size", [0, 7, 2 * MIB - 1, 2 * MIB, 3 * MIB + 12345])
def test_file_hashes_match_oracles(tmp_path: Path, size: int) -> None:
    data = _random_bytes(size, size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest().upper()
    expected_v1 = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8].upper() if size >= 2 * MIB else None
    expected_crc = f"{zlib.crc32(data):08X}"
    expected_crc = "".join(reversed([expected_crc[i : i + 2] for i in range(0, 8, 2)]))

    found = hashes.file_hashes(path)
    assert found.size == size
    assert found.sha256 == sha == hashes.sha256(path)
    assert found.auto_v2 == sha[:10] == hashes.auto_v2(path)
    assert found.auto_v1 == expected_v1 == hashes.auto_v1(path)
    assert found.crc32 == expected_crc == hashes.crc32(path)
    assert found.auto_v3 == hashes.auto_v3(path)
    if size >= 8 and 8 + int.from_bytes(data[:8], "little") > size:
        assert found.auto_v3 is None


def test_auto_v3_is_the_data_section_of_a_safetensors_file(tmp_path: Path) -> None:
    tensors = {"big": random_tensor((800_000,), torch.float32, 1), "small": random_tensor((3, 3), torch.float16, 2)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, {"ss_network_dim": "8", "title": "x"})
    raw = path.read_bytes()
    assert len(raw) > 2 * MIB

    expected = hashlib.sha256(_data_section(raw)).hexdigest()
    assert hashes.auto_v3(path) == expected.upper()
    assert hashes.sshs_model_hash(path) == expected
    found = hashes.file_hashes(path)
    assert found.auto_v3 == expected.upper()
    assert found.auto_v1 == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8].upper()
    # kohya's precalculate: the data section of safetensors.torch.save(tensors, ss_* metadata only).
    assert hashlib.sha256(_data_section(save(tensors, {"ss_network_dim": "8"}))).hexdigest() == expected


def _kohya_legacy(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """kohya's sshs_legacy_hash, as train_util.precalculate_safetensors_hashes computes it."""
    training = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    buffer = save(tensors, training)
    return hashlib.sha256(buffer[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


@pytest.mark.parametrize("writer", ["safetensors", "lorakit"])
def test_sshs_legacy_hash_matches_kohya(tmp_path: Path, writer: str) -> None:
    tensors = {
        "lora_unet_a.lora_down.weight": random_tensor((300, 1000), torch.float16, 3),
        "lora_unet_a.alpha": torch.tensor(4.0),
        "lora_unet_b.lora_up.weight": random_tensor((1000, 300), torch.bfloat16, 4),
    }
    metadata = {"ss_network_dim": "8", "ss_network_alpha": "4", "modelspec.title": "demo", "sshs_model_hash": "x"}
    path = tmp_path / "lora.safetensors"
    if writer == "safetensors":
        save_file(tensors, path, metadata)
    else:
        write_file(path, tensors, metadata)
    assert hashes.sshs_legacy_hash(path) == _kohya_legacy(tensors, metadata)


@pytest.mark.parametrize("header_end", [0x100000 + 0x8000, 0x100000 + 0x20000], ids=["straddles", "inside"])
def test_sshs_legacy_hash_when_the_window_reaches_the_header(tmp_path: Path, header_end: int) -> None:
    # One ss_ key (so safetensors' metadata order cannot vary) big enough to push the window into the header.
    tensors = {"w": random_tensor((40_000,), torch.float32, 5)}
    overhead = len(save(tensors, {"ss_tag_frequency": ""})) - 160_000
    metadata = {"ss_tag_frequency": "t" * (header_end - overhead), "other": "y"}
    path = tmp_path / "tags.safetensors"
    save_file(tensors, path, metadata)
    kohya_header_end = len(save(tensors, {"ss_tag_frequency": metadata["ss_tag_frequency"]})) - 160_000
    assert abs(kohya_header_end - header_end) < 8
    assert hashes.sshs_legacy_hash(path) == _kohya_legacy(tensors, metadata)


def test_sshs_legacy_hash_of_a_small_file(tmp_path: Path) -> None:
    tensors = {"w": torch.ones(4)}
    path = tmp_path / "small.safetensors"
    save_file(tensors, path)
    assert hashes.sshs_legacy_hash(path) == _kohya_legacy(tensors, {}) == "e3b0c442"
