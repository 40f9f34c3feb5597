"""Pickled checkpoints are refused unless the caller opts in, and then loaded with weights_only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import FileFormatError, UnsafeFileError
from lorakit.formats.safetensors_io import load_any, looks_like_safetensors

torch.set_num_threads(1)  # small ops are far slower with two threads on the 2-core test machines

SIDE_EFFECTS: list[str] = []


def _record_side_effect(text: str) -> str:
    SIDE_EFFECTS.append(text)
    return text


class Payload:
    """Unpickling this calls a function: what a malicious checkpoint does."""

    def __reduce__(self) -> tuple:
        return (_record_side_effect, ("ran code",))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_refused_by_default(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(UnsafeFileError) as caught:
        load_any(path)
    message = str(caught.value)
    assert f"model{suffix}" in message and "allow_pickle=True" in message and "--allow-pickle" in message
    assert "\n" not in message


def test_pickle_allowed_with_opt_in(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    path = tmp_path / "model.pt"
    torch.save(tensors, path)
    loaded, metadata = load_any(path, allow_pickle=True)
    assert metadata == {}
    assert set(loaded) == {"w", "b"}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_state_dict_is_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "epoch": 3, "global_step": 100}, path)
    loaded, _ = load_any(path, allow_pickle=True)
    assert list(loaded) == ["model.w"]


def test_legacy_non_zip_pickle(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError):
        load_any(path)
    loaded, _ = load_any(path, allow_pickle=True)
    assert torch.equal(loaded["w"], torch.ones(2))


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload()}, path)
    SIDE_EFFECTS.clear()
    with pytest.raises(FileFormatError, match="evil.pt.*weights_only"):
        load_any(path, allow_pickle=True)
    assert SIDE_EFFECTS == []


def test_pickle_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(FileFormatError, match="no tensors"):
        load_any(path, allow_pickle=True)
    torch.save([torch.ones(1)], path)
    with pytest.raises(FileFormatError, match="not a mapping"):
        load_any(path, allow_pickle=True)


def test_damaged_pickle(tmp_path: Path) -> None:
    path = tmp_path / "broken.ckpt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(FileFormatError, match="broken.ckpt"):
        load_any(path, allow_pickle=True)


def test_safetensors_is_sniffed_whatever_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "really_safetensors.bin"
    save_file({"w": torch.ones(2)}, path, {"k": "v"})
    assert looks_like_safetensors(path)
    loaded, metadata = load_any(path)
    assert torch.equal(loaded["w"], torch.ones(2)) and metadata == {"k": "v"}


def test_safetensors_suffix_uses_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.ones(2)}, path)
    loaded, metadata = load_any(path)
    assert list(loaded) == ["w"] and metadata == {}
    # A pickle renamed to .safetensors is a format error, never unpickled.
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(FileFormatError, match="lora.safetensors"):
        load_any(path, allow_pickle=True)


def test_unknown_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello world, not a model")
    assert not looks_like_safetensors(path)
    with pytest.raises(FileFormatError, match="notes.txt.*neither"):
        load_any(path, allow_pickle=True)
