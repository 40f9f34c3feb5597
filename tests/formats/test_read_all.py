"""read_file through a private map: the same tensors as safetensors reads, independent of the file afterwards."""

from __future__ import annotations

import struct

import torch
from formats_helpers import make_sample_tensors, same_bits, write_raw
from safetensors.torch import load_file, save_file

from lorakit.formats.safetensors_io import read_file

torch.set_num_threads(1)


def test_same_tensors_as_safetensors_and_contiguous(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file(make_sample_tensors(), str(path), metadata={"a": "b"})
    tensors, metadata = read_file(path)
    reference = load_file(str(path))
    assert metadata == {"a": "b"} and set(tensors) == set(reference)
    for key, tensor in reference.items():
        assert same_bits(tensors[key], tensor) and tensors[key].is_contiguous(), key


def test_writes_never_reach_the_file_and_views_outlive_it(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(path))
    before = path.read_bytes()
    tensors, _ = read_file(path)
    tensors["x"].mul_(10)
    assert path.read_bytes() == before
    path.unlink()
    assert tensors["x"].sum().item() == 150.0


def test_misaligned_offsets_are_copied_out(tmp_path):
    # a 1-byte U8 tensor first puts the F32 tensor at an odd offset, which safetensors' writer never does
    data = bytes([7]) + struct.pack("<3f", 1.5, -2.0, 3.25)
    header = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
    }
    tensors, _ = read_file(write_raw(tmp_path / "odd.safetensors", header, data))
    assert tensors["a"].tolist() == [7] and tensors["b"].tolist() == [1.5, -2.0, 3.25]
