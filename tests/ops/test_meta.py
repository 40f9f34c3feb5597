"""meta: the header changes, the tensor bytes (AutoV3) do not, and the embedded hashes are right afterwards."""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from lorakit.errors import FileFormatError, InputError, OutputError
from lorakit.ops.meta import edit_metadata, strip_paths_in

torch.set_num_threads(1)


def _data_section(path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little") :]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # over 1 MiB, so kohya's legacy hash window (bytes 0x100000..0x110000) falls in the tensor data
    return {
        "lora_unet_x.lora_down.weight": torch.randn(4, 70000, generator=g),
        "lora_unet_x.lora_up.weight": torch.randn(320, 4, generator=g).half(),
        "lora_unet_x.alpha": torch.tensor(2.0),
    }


@pytest.fixture
def kohya_file(tmp_path):
    path = tmp_path / "in.safetensors"
    save_file(
        _tensors(),
        str(path),
        metadata={
            "ss_output_dir": "/home/alice/train/out",
            "sshs_model_hash": "0" * 64,
            "sshs_legacy_hash": "deadbeef",
            "modelspec.hash_sha256": "0x" + "1" * 64,
            "modelspec.title": "old",
        },
    )
    return path


def test_header_edit_keeps_tensor_bytes_and_refreshes_hashes(kohya_file, tmp_path):
    before = kohya_file.read_bytes()
    out = tmp_path / "out.safetensors"
    result = edit_metadata(kohya_file, out, set_values={"modelspec.title": "new", "note": "ü"}, strip_paths=True)
    assert kohya_file.read_bytes() == before  # the input is untouched
    data = _data_section(out)
    assert data == _data_section(kohya_file)
    autov3 = hashlib.sha256(data).hexdigest()
    assert result.auto_v3 == autov3.upper()
    with safe_open(str(out), "pt") as f:  # safetensors itself reads the result
        meta = f.metadata()
        for key, tensor in _tensors().items():
            assert torch.equal(f.get_tensor(key), tensor)
    assert meta["modelspec.title"] == "new" and meta["note"] == "ü" and meta["ss_output_dir"] == "out"
    assert meta["sshs_model_hash"] == autov3 and meta["modelspec.hash_sha256"] == "0x" + autov3
    # kohya's legacy hash: its file with only the ss_* metadata, bytes 0x100000..0x110000
    virtual = save(_tensors(), metadata={"ss_output_dir": "out"})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(virtual[0x100000:0x110000]).hexdigest()[:8]
    assert result.refreshed == {k: meta[k] for k in ("sshs_model_hash", "modelspec.hash_sha256", "sshs_legacy_hash")}
    assert result.path_keys == ["ss_output_dir"] and result.set_keys == ["modelspec.title", "note"]


def test_strip_drops_all_metadata(kohya_file, tmp_path):
    out = tmp_path / "bare.safetensors"
    result = edit_metadata(kohya_file, out, strip=True)
    header = json.loads(out.read_bytes()[8 : 8 + int.from_bytes(out.read_bytes()[:8], "little")])
    assert "__metadata__" not in header and len(result.removed_keys) == 5
    assert _data_section(out) == _data_section(kohya_file)


def test_strip_paths_rules():
    datasets = json.dumps([{"image_dir": "/data/me/10_cat", "subsets": [{"image_dir": "C:\\Users\\me\\imgs"}]}])
    stripped = json.loads(strip_paths_in(datasets))
    assert stripped == [{"image_dir": "10_cat", "subsets": [{"image_dir": "imgs"}]}]
    tags = json.dumps({"/home/me/data/10_cat": {"cat": 3}})
    assert json.loads(strip_paths_in(tags)) == {"10_cat": {"cat": 3}}
    assert strip_paths_in("/home/me/models/sd15.safetensors") == "sd15.safetensors"
    assert strip_paths_in("--config /home/me/cfg/a.toml --x 1") == "--config a.toml --x 1"
    for kept in ("1/2", "https://example.com/a/b", "relative/dir", "sd_v1"):
        assert strip_paths_in(kept) == kept


def test_error_paths(kohya_file, tmp_path, monkeypatch):
    with pytest.raises(OutputError, match="is also an input"):
        edit_metadata(kohya_file, kohya_file, strip=True)
    with pytest.raises(InputError, match="no such file"):
        edit_metadata(tmp_path / "missing.safetensors", tmp_path / "o.safetensors")
    with pytest.raises(InputError, match="is a folder"):
        edit_metadata(tmp_path, tmp_path / "o.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json at all!")
    with pytest.raises(FileFormatError):
        edit_metadata(tmp_path / "junk.safetensors", tmp_path / "o.safetensors")
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(OutputError, match="not writable"):
        edit_metadata(kohya_file, tmp_path / "o.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "junk.safetensors"]


def test_disk_full_leaves_no_output(kohya_file, tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(OutputError, match="free disk space"):
        edit_metadata(kohya_file, tmp_path / "full.safetensors", strip_paths=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
