"""Round trips between lorakit's reader/writer and safetensors itself."""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from formats_helpers import DTYPES, make_sample_tensors, random_tensor, same_bits, write_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.formats.safetensors_io import SafetensorsReader, TensorSource, read_file, write_file

torch.set_num_threads(1)  # small ops are far slower with two threads on the 2-core test machines


def test_our_file_loads_in_safetensors(tmp_path: Path) -> None:
    sample_tensors = make_sample_tensors()
    metadata = {"ss_network_dim": "8", "title": 'ünïcode "quoted"\nline', "empty": ""}
    out = tmp_path / "ours.safetensors"
    write_file(out, sample_tensors, metadata)

    loaded = load_file(out)
    assert set(loaded) == set(sample_tensors)
    for name, tensor in sample_tensors.items():
        assert same_bits(loaded[name], tensor), name
    with safe_open(out, framework="pt") as handle:
        assert handle.metadata() == metadata
        for name, tensor in sample_tensors.items():
            assert same_bits(handle.get_tensor(name), tensor), name


def test_safetensors_file_reads_in_ours(tmp_path: Path) -> None:
    sample_tensors = make_sample_tensors()
    metadata = {"a": "1", "b": "two"}
    out = tmp_path / "theirs.safetensors"
    save_file(sample_tensors, out, metadata)

    tensors, read_metadata = read_file(out)
    assert read_metadata == metadata
    assert set(tensors) == set(sample_tensors)
    for name, tensor in sample_tensors.items():
        assert same_bits(tensors[name], tensor), name


def test_bytes_identical_to_save_file(tmp_path: Path) -> None:
    sample_tensors = make_sample_tensors()
    # With at most one metadata key the metadata order cannot differ, so every byte must match.
    for metadata in (None, {}, {"only": "one"}):
        ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
        write_file(ours, sample_tensors, metadata)
        save_file(sample_tensors, theirs, metadata)
        assert ours.read_bytes() == theirs.read_bytes(), metadata


def test_same_input_same_bytes(tmp_path: Path) -> None:
    sample_tensors = make_sample_tensors()
    metadata = {f"key{i}": str(i) for i in range(20)}
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    write_file(first, sample_tensors, metadata)
    reversed_tensors = dict(reversed(list(sample_tensors.items())))
    write_file(second, reversed_tensors, dict(reversed(list(metadata.items()))))
    assert first.read_bytes() == second.read_bytes()
    # The header lists metadata first with sorted keys.
    with SafetensorsReader(first) as reader:
        assert list(reader.metadata) == sorted(metadata)


def test_sources_in_any_order_give_same_bytes(tmp_path: Path) -> None:
    sample_tensors = make_sample_tensors()
    sources = [TensorSource.of(name, tensor) for name, tensor in sample_tensors.items()]
    write_file(tmp_path / "a.safetensors", sources)
    write_file(tmp_path / "b.safetensors", list(reversed(sources)))
    write_file(tmp_path / "c.safetensors", sample_tensors)
    data = {(tmp_path / f"{n}.safetensors").read_bytes() for n in "abc"}
    assert len(data) == 1


def test_data_is_aligned_to_item_size(tmp_path: Path) -> None:
    sample_tensors = make_sample_tensors()
    out = tmp_path / "aligned.safetensors"
    write_file(out, sample_tensors)
    with SafetensorsReader(out) as reader:
        assert reader.data_offset % 8 == 0
        for entry in reader.header.entries:
            itemsize = torch.empty((), dtype=entry.torch_dtype).element_size()
            assert (reader.data_offset + entry.begin) % itemsize == 0, entry.name


def test_streaming_produces_one_tensor_at_a_time(tmp_path: Path) -> None:
    alive: list[int] = []
    produced: list[weakref.ref[torch.Tensor]] = []

    def make(i: int) -> torch.Tensor:
        # Tensors produced earlier must be gone by now: the writer keeps only the one it is writing.
        alive.append(sum(1 for ref in produced if ref() is not None))
        tensor = torch.full((256, 256), float(i))
        produced.append(weakref.ref(tensor))
        return tensor

    sources = [TensorSource(f"w{i:02d}", torch.float32, (256, 256), lambda i=i: make(i)) for i in range(12)]
    write_file(tmp_path / "stream.safetensors", sources)
    assert alive == [0] * 12
    loaded = load_file(tmp_path / "stream.safetensors")
    assert all(torch.all(loaded[f"w{i:02d}"] == i) for i in range(12))


def test_non_contiguous_and_grad_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "slice": base[:, ::2], "grad": torch.ones(3, requires_grad=True)}
    out = tmp_path / "nc.safetensors"
    write_file(out, tensors)
    loaded = load_file(out)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.detach().contiguous())


def test_reader_api(tmp_path: Path) -> None:
    # Header order (not alphabetical) is the order keys() reports.
    data = (
        torch.arange(6, dtype=torch.float32).numpy().tobytes()
        + torch.tensor([7, 8], dtype=torch.int16).numpy().tobytes()
    )
    header = {
        "zeta": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "alpha": {"dtype": "I16", "shape": [2], "data_offsets": [24, 28]},
        "__metadata__": {"format": "pt"},
    }
    path = write_raw(tmp_path / "hand.safetensors", header, data)
    with SafetensorsReader(path) as reader:
        assert reader.keys() == ["zeta", "alpha"]
        assert reader.metadata == {"format": "pt"}
        assert reader.shape("zeta") == (2, 3)
        assert reader.dtype("alpha") == torch.int16
        assert reader.data_offset == 8 + reader.header_size
        assert "zeta" in reader and "missing" not in reader and len(reader) == 2
        assert reader.read_raw("zeta", 4, 8) == data[4:8]
        zeta = reader.get("zeta")
        items = dict(reader.items())
    # Tensors own their memory: usable after close, writable, not views of each other.
    zeta += 1
    assert torch.equal(zeta, torch.arange(6, dtype=torch.float32).reshape(2, 3) + 1)
    assert torch.equal(items["alpha"], torch.tensor([7, 8], dtype=torch.int16))


def test_reader_allows_gaps_and_unsorted_offsets(tmp_path: Path) -> None:
    data = bytes(range(16))
    header = {
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [12, 16]},
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
    }
    tensors, _ = read_file(write_raw(tmp_path / "gap.safetensors", header, data))
    assert tensors["a"].tolist() == [0, 1, 2, 3]
    assert tensors["b"].tolist() == [12, 13, 14, 15]


def test_missing_key_is_key_error(tmp_path: Path) -> None:
    out = tmp_path / "one.safetensors"
    write_file(out, {"a": torch.zeros(1)})
    with SafetensorsReader(out) as reader:
        try:
            reader.get("b")
        except KeyError as exc:
            assert "one.safetensors" in str(exc) and "'b'" in str(exc)
        else:
            raise AssertionError("expected KeyError")


def test_all_dtypes_survive_both_directions(tmp_path: Path) -> None:
    for dtype in DTYPES:
        tensor = random_tensor((2, 3), dtype, 7)
        out = tmp_path / f"{str(dtype).removeprefix('torch.')}.safetensors"
        write_file(out, {"x": tensor})
        assert same_bits(load_file(out)["x"], tensor)
        assert same_bits(read_file(out)[0]["x"], tensor)


_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12).filter(
    lambda s: s != "__metadata__"
)
_tensor_specs = st.dictionaries(
    _names,
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), min_size=0, max_size=3), st.integers(0, 1000)),
    max_size=6,
)
_metadata = st.none() | st.dictionaries(_names, st.text(st.characters(blacklist_categories=("Cs",))), max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=_tensor_specs, metadata=_metadata)
def test_round_trip_property(tmp_path: Path, specs: dict, metadata: dict[str, str] | None) -> None:
    tensors = {name: random_tensor(tuple(shape), dtype, seed) for name, (dtype, shape, seed) in specs.items()}
    out = tmp_path / "prop.safetensors"
    write_file(out, tensors, metadata)

    ours, our_metadata = read_file(out)
    with safe_open(out, framework="pt") as handle:
        assert (handle.metadata() or {}) == (metadata or {})
        theirs = {name: handle.get_tensor(name) for name in handle.keys()}
    assert our_metadata == (metadata or {})
    assert set(ours) == set(theirs) == set(tensors)
    for name, tensor in tensors.items():
        assert same_bits(ours[name], tensor)
        assert same_bits(theirs[name], tensor)
