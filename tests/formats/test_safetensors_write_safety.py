"""The writer is atomic, never touches an input, and validates before any I/O."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import OutputError
from lorakit.formats import safetensors_writer
from lorakit.formats.hashes import sshs_model_hash
from lorakit.formats.safetensors_io import SafetensorsReader, TensorSource, check_output_path, write_file

torch.set_num_threads(1)  # small ops are far slower with two threads on the 2-core test machines


def _failing_sources(fail_at: int, error: BaseException) -> list[TensorSource]:
    def make(i: int) -> torch.Tensor:
        if i == fail_at:
            raise error
        return torch.full((64,), float(i))

    return [TensorSource(f"w{i}", torch.float32, (64,), lambda i=i: make(i)) for i in range(5)]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_failing_producer_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(type(error)):
        write_file(out, _failing_sources(2, error))
    assert list(tmp_path.iterdir()) == []


def test_failing_producer_keeps_previous_file(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    write_file(out, {"old": torch.ones(3)})
    before = out.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        write_file(out, _failing_sources(4, RuntimeError("boom")))
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_producer_mismatch_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    wrong_shape = [TensorSource("w", torch.float32, (3,), lambda: torch.zeros(4))]
    with pytest.raises(ValueError, match="'w'.*declared"):
        write_file(out, wrong_shape)
    wrong_dtype = [TensorSource("w", torch.float32, (3,), lambda: torch.zeros(3, dtype=torch.float16))]
    with pytest.raises(ValueError, match="'w'"):
        write_file(out, wrong_dtype)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_output_error_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_writer.os, "fsync", no_space)
    out = tmp_path / "out.safetensors"
    with pytest.raises(OutputError, match="out.safetensors.*free disk space"):
        write_file(out, {"w": torch.ones(3)})
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "in.safetensors"
    write_file(source, {"w": torch.ones(3)})
    before = source.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(source)
    hard = tmp_path / "hard.safetensors"
    os.link(source, hard)
    relative = os.path.relpath(source)
    (tmp_path / "sub").mkdir()
    for out in (source, str(source), link, hard, relative, tmp_path / "sub" / ".." / "in.safetensors"):
        with pytest.raises(OutputError, match="is also an input"):
            write_file(out, {"w": torch.zeros(3)}, inputs=[source])
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hard.safetensors",
        "in.safetensors",
        "link.safetensors",
        "sub",
    ]


def test_missing_folder_and_folder_target_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        write_file(tmp_path / "missing" / "out.safetensors", {"w": torch.ones(1)})
    with pytest.raises(OutputError, match="is a folder"):
        write_file(tmp_path, {"w": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            write_file(folder / "out.safetensors", {"w": torch.ones(1)})
    finally:
        folder.chmod(0o755)


def test_check_output_path_before_work(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "new.safetensors") == tmp_path / "new.safetensors"
    with pytest.raises(OutputError):
        check_output_path(tmp_path / "a" / "b.safetensors")


def test_bad_names_and_metadata_fail_before_io(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="__metadata__"):
        write_file(out, {"__metadata__": torch.ones(1)})
    with pytest.raises(ValueError, match="twice"):
        write_file(out, [TensorSource.of("a", torch.ones(1)), TensorSource.of("a", torch.ones(2))])
    with pytest.raises(ValueError, match="cannot be stored"):
        write_file(out, {"bad\udc80": torch.ones(1)})
    with pytest.raises(ValueError, match="complex128|cannot be stored"):
        write_file(out, {"c": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(TypeError, match="strings to strings"):
        write_file(out, {"a": torch.ones(1)}, {"steps": 100})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="Unicode"):
        write_file(out, {"a": torch.ones(1)}, {"k": "\udc80"})
    assert list(tmp_path.iterdir()) == []


def test_new_file_permissions_follow_umask(tmp_path: Path) -> None:
    out = tmp_path / "perm.safetensors"
    write_file(out, {"w": torch.ones(1)})
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_hash_fields_are_filled_in_place(tmp_path: Path) -> None:
    out = tmp_path / "hashed.safetensors"
    tensors = {"a": torch.randn(100, 10), "b": torch.randn(7).half()}
    fields = {"sshs_model_hash": "{sha256}", "modelspec.hash_sha256": "0x{sha256}"}
    written = write_file(out, tensors, {"ss_network_dim": "4"}, hash_fields=fields)

    digest = sshs_model_hash(out)
    assert written.data_sha256 == digest
    assert written.size == out.stat().st_size
    with SafetensorsReader(out) as reader:
        assert reader.metadata == {
            "ss_network_dim": "4",
            "sshs_model_hash": digest,
            "modelspec.hash_sha256": "0x" + digest,
        }
    assert set(load_file(out)) == {"a", "b"}
    with pytest.raises(ValueError, match="given and a hash field"):
        write_file(out, tensors, {"sshs_model_hash": "x"}, hash_fields=fields)
    with pytest.raises(ValueError, match="no \\{sha256\\}"):
        write_file(out, tensors, hash_fields={"h": "0x"})


def test_hash_data_without_fields(tmp_path: Path) -> None:
    out = tmp_path / "h.safetensors"
    assert write_file(out, {"w": torch.ones(3)}).data_sha256 is None
    assert write_file(out, {"w": torch.ones(3)}, hash_data=True).data_sha256 == sshs_model_hash(out)


def test_empty_file_has_no_tensors(tmp_path: Path) -> None:
    out = tmp_path / "empty.safetensors"
    written = write_file(out, {}, {"note": "nothing"})
    assert load_file(out) == {}
    assert written.size == out.stat().st_size


def test_unwritable_folder_is_refused_even_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root passes any permission check, so simulate the answers a normal user would get.
    monkeypatch.setattr(safetensors_writer.os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="not writable"):
        write_file(tmp_path / "out.safetensors", {"w": torch.ones(1)})


def test_temp_file_creation_failure_is_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only_fs(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(safetensors_writer.os, "open", read_only_fs)
    with pytest.raises(OutputError, match="cannot create a file there"):
        write_file(tmp_path / "out.safetensors", {"w": torch.ones(1)})
