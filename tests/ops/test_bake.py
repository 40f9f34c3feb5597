"""bake: every baked tensor equals ``W + sum_i w_i m(t) D_i(W)`` (dense torch reference), diffusers' ``fuse_lora``
agrees, and the file handling is safe (atomic, inputs untouched, strict coverage)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from ckpt_models import (
    components,
    diffusers_weights,
    expected_weights,
    random_lora,
    table_name,
    write_folder,
    write_single_file,
)

from lorakit.core.patches import LokrPatch, LoraPatch
from lorakit.errors import OutputError, TargetError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.checkpoint import Checkpoint
from lorakit.formats.lora_io import load_lora, save_lora
from lorakit.formats.safetensors_reader import SafetensorsReader
from lorakit.ops.bake import _to_diffusers, bake_checkpoint, load_for_checkpoint
from lorakit.ops.blocks import parse_block_weights

torch.set_num_threads(1)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_matches(out_path, arch, expected, dtype=torch.float32):
    with Checkpoint.open(out_path, arch=arch) as out:
        checked = 0
        for component, table in expected.items():
            for module, want in table.items():
                ref = out.weight_ref(component, module)
                if ref is None:
                    continue
                got = out.read(ref.key)
                got = _to_diffusers(got if ref.rows is None else got[ref.rows[0] : ref.rows[1]], ref.transform)
                assert got.dtype == dtype
                torch.testing.assert_close(got, want, msg=f"{component}.{module}")
                checked += 1
    assert checked > 20


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "flux", "sd3"])
def test_single_file_bake_equals_dense_reference(tmp_path, arch):
    base = write_single_file(tmp_path / "base.safetensors", arch)
    before = _digest(base)
    first, second = random_lora(arch, seed=0), random_lora(arch, seed=1)
    with Checkpoint.open(base, arch=arch) as ckpt:
        report = bake_checkpoint(ckpt, [("a", first, 0.7), ("b", second, -0.4)], tmp_path / "out.safetensors")
    assert not report.unmatched and report.matched == len(first.patches) + len(second.patches)
    _assert_matches(tmp_path / "out.safetensors", arch, expected_weights(arch, [(first, 0.7), (second, -0.4)]))
    assert _digest(base) == before
    with SafetensorsReader(base) as a, SafetensorsReader(tmp_path / "out.safetensors") as b:
        assert set(a.keys()) == set(b.keys())
        assert torch.equal(
            a.get("first_stage_model.decoder.conv_in.weight"), b.get("first_stage_model.decoder.conv_in.weight")
        )
        assert b.metadata["modelspec.title"] == "tiny" and "sshs_model_hash" not in b.metadata
        assert json.loads(b.metadata["lorakit.baked"])["loras"] == [
            {"name": "a", "weight": 0.7},
            {"name": "b", "weight": -0.4},
        ]


def test_fp16_checkpoint_accumulates_in_fp32_and_casts_once(tmp_path):
    base = write_single_file(tmp_path / "base.safetensors", "sd1", dtype=torch.float16)
    lora = random_lora("sd1", seed=2)
    with Checkpoint.open(base, arch="sd1") as ckpt:
        bake_checkpoint(ckpt, [("a", lora, 1.3)], tmp_path / "out.safetensors")
    want = expected_weights("sd1", [(lora, 1.3)], dtype=torch.float16)
    _assert_matches(tmp_path / "out.safetensors", "sd1", want, dtype=torch.float16)


def test_dtype_option_casts_float_tensors(tmp_path):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    with Checkpoint.open(base, arch="sd1") as ckpt:
        report = bake_checkpoint(
            ckpt, [("a", random_lora("sd1"), 1.0)], tmp_path / "o.safetensors", dtype=torch.bfloat16
        )
    assert report.dtype == "bfloat16"
    with SafetensorsReader(tmp_path / "o.safetensors") as out:
        assert {out.dtype(k) for k in out.keys()} == {torch.bfloat16}


@pytest.mark.parametrize("spec", ["MIDD", "1,0.5,0,1,-1,0,2,1,0,1,1,0.25,0,0,1,1,0.5"])
def test_block_weights_are_applied_per_target(tmp_path, spec):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    lora = random_lora("sd1", seed=0, every=2)
    with Checkpoint.open(base, arch="sd1") as ckpt:
        bake_checkpoint(ckpt, [("a", lora, 0.8)], tmp_path / "out.safetensors", blocks=spec)
    blocks = parse_block_weights(spec, "sd1")
    _assert_matches(tmp_path / "out.safetensors", "sd1", expected_weights("sd1", [(lora, 0.8)], blocks))


def test_folder_bake_equals_dense_reference_and_copies_the_rest(tmp_path):
    base = write_folder(tmp_path / "base", "sdxl")
    lora = random_lora("sdxl", seed=4)
    with Checkpoint.open(base, arch="sdxl") as ckpt:
        report = bake_checkpoint(ckpt, [("a", lora, 0.9)], tmp_path / "out")
    assert report.layout == "diffusers" and not report.unmatched
    _assert_matches(tmp_path / "out", "sdxl", expected_weights("sdxl", [(lora, 0.9)]))
    copied = sorted(p.relative_to(base) for p in base.rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert (base / "vae" / "config.json").read_bytes() == (tmp_path / "out" / "vae" / "config.json").read_bytes()
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert _digest(base / vae) != "" and _tensors(base / vae).keys() == _tensors(tmp_path / "out" / vae).keys()


def _tensors(path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as reader:
        return dict(reader.items())


def _plain_lora(arch: str, seed: int) -> LoraFile:
    """Plain LoRAs (alpha != rank) on every other Linear / conv: what diffusers' loader takes."""
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for component, model in components(arch).items():
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        for name, module in linears[::2]:
            out, inp = module.weight.shape
            patches[Target(component, table_name(arch, name, component))] = LoraPatch(
                up=torch.randn(out, 3, generator=g), down=torch.randn(3, inp, generator=g) * 0.3, alpha=1.5
            )
    return LoraFile(patches=patches, dialect="lorakit", arch=arch)


def test_diffusers_fuse_lora_gives_the_same_weights(tmp_path):
    """The UNet only: diffusers 0.42 with transformers 5 cannot load kohya text-encoder keys into a CLIP model
    (it reports them as unexpected); the encoders are covered by the dense reference above."""
    from lorakit.models.tiny import build_tiny_pipeline

    base = write_folder(tmp_path / "base", "sd1")
    lora_path = tmp_path / "lora.safetensors"
    with Checkpoint.open(base, arch="sd1") as ckpt:
        save_lora(
            _plain_lora("sd1", 5), lora_path, dialect="kohya", modules={c: ckpt.shapes(c) for c in ckpt.components()}
        )
        lora = load_for_checkpoint(lora_path, ckpt)
        bake_checkpoint(ckpt, [("lora", lora, 0.6)], tmp_path / "out")
    pipe = build_tiny_pipeline("sd1", seed=0)
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora(lora_scale=0.6)
    baked = _tensors(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    compared = 0
    for key, value in baked.items():
        torch.testing.assert_close(value, fused[key], rtol=1e-5, atol=1e-6, msg=key)
        compared += 1
    assert compared == len(baked)


def test_lokr_on_a_fused_flux_weight_changes_its_rows(tmp_path):
    base = write_single_file(tmp_path / "flux.safetensors", "flux")
    g = torch.Generator().manual_seed(3)
    with Checkpoint.open(base, arch="flux") as ckpt:
        key = ckpt.weight_ref("transformer", "transformer_blocks.0.attn.to_q").key
        rows, cols = ckpt.shape(key)
        patch = LokrPatch(w1=torch.randn(3, 2, generator=g), w2=torch.randn(rows // 3, cols // 2, generator=g))
        tensors = {
            f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v
            for k, v in {"lokr_w1": patch.w1, "lokr_w2": patch.w2}.items()
        }
        lora = load_lora(tensors, modules={c: ckpt.shapes(c) for c in ckpt.components()}, arch="flux")
        assert {t.rows for t in lora.patches} == {(0, rows // 3), (rows // 3, 2 * rows // 3), (2 * rows // 3, rows)}
        base_w = ckpt.read(key)
        bake_checkpoint(ckpt, [("lokr", lora, 0.5)], tmp_path / "out.safetensors")
    got = _tensors(tmp_path / "out.safetensors")[key]
    torch.testing.assert_close(got, base_w + 0.5 * torch.kron(patch.w1, patch.w2))


def test_unmatched_targets_are_an_error_unless_allowed(tmp_path):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    lora = random_lora("sd1", seed=0)
    lora.patches[Target("unet", "no.such.module")] = next(iter(lora.patches.values()))
    with Checkpoint.open(base, arch="sd1") as ckpt:
        with pytest.raises(TargetError, match="no.such.module"):
            bake_checkpoint(ckpt, [("a", lora, 1.0)], tmp_path / "out.safetensors")
        assert not (tmp_path / "out.safetensors").exists()
        report = bake_checkpoint(ckpt, [("a", lora, 1.0)], tmp_path / "out.safetensors", allow_missing=True)
    assert report.unmatched == ["a: unet.no.such.module: no such weight in the checkpoint"]


def test_output_equal_to_an_input_is_refused(tmp_path):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    before = _digest(base)
    with Checkpoint.open(base, arch="sd1") as ckpt, pytest.raises(OutputError, match="also an input"):
        bake_checkpoint(ckpt, [("a", random_lora("sd1"), 1.0)], base)
    assert _digest(base) == before


def test_folder_output_into_its_input_or_existing_is_refused(tmp_path):
    base = write_folder(tmp_path / "base", "sd1")
    (tmp_path / "exists").mkdir()
    with Checkpoint.open(base, arch="sd1") as ckpt:
        for target in (base, base / "sub", tmp_path / "exists"):
            with pytest.raises(OutputError):
                bake_checkpoint(ckpt, [("a", random_lora("sd1"), 1.0)], target)


@pytest.mark.parametrize("layout", ["single-file", "diffusers"])
def test_a_failing_read_leaves_no_partial_output(tmp_path, monkeypatch, layout):
    base = (
        write_single_file(tmp_path / "b.safetensors", "sd1")
        if layout == "single-file"
        else write_folder(tmp_path / "b", "sd1")
    )
    out = tmp_path / ("out.safetensors" if layout == "single-file" else "out")
    with Checkpoint.open(base, arch="sd1") as ckpt:
        calls = {"n": 0}
        real = ckpt.read

        def failing(key):
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError(28, "No space left on device")
            return real(key)

        monkeypatch.setattr(ckpt, "read", failing)
        with pytest.raises((OSError, OutputError)):
            bake_checkpoint(ckpt, [("a", random_lora("sd1"), 1.0)], out)
    leftovers = {p.name for p in tmp_path.iterdir()} - {base.name}
    assert leftovers == set()


def test_inputs_weights_match_the_live_models():
    """The helper's reference side is the live model (guards the oracle itself)."""
    weights = diffusers_weights("sd1")
    unet = components("sd1")["unet"]
    assert torch.equal(weights["unet"]["conv_in"], unet.conv_in.weight)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_writer_writes_the_bytes_write_file_writes(tmp_path, monkeypatch, direct):
    from lorakit.formats.safetensors_writer import TensorSource, write_file
    from lorakit.ops.bake_io import write_direct

    if not direct:
        monkeypatch.delattr("os.O_DIRECT", raising=False)  # the page-cache fallback (tmpfs refuses O_DIRECT)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(3_000_001, generator=g),
        "half": torch.randn(7, 13, generator=g).half(),
        "ints": torch.arange(5),
        "bf": torch.randn(3, generator=g).bfloat16(),
        "empty": torch.zeros(0, 4),
    }
    meta = {"b": "2", "a": "é"}
    write_file(tmp_path / "ref.safetensors", tensors, meta)
    size = write_direct(tmp_path / "out.safetensors", [TensorSource.of(k, v) for k, v in tensors.items()], meta)
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert size == (tmp_path / "ref.safetensors").stat().st_size


def test_direct_writer_failure_leaves_nothing(tmp_path, monkeypatch):
    from lorakit.formats.safetensors_writer import TensorSource
    from lorakit.ops import bake_io

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bake_io, "_os_write", full)
    with pytest.raises(OutputError, match="No space left"):
        bake_io.write_direct(tmp_path / "o.safetensors", [TensorSource.of("a", torch.zeros(10))], None)
    assert list(tmp_path.iterdir()) == []


def test_read_ahead_keeps_order_and_bounds_what_is_in_flight():
    """Two workers produce out of order (random delays); the writer still gets layout order, and no more than
    ``workers`` tensors beyond the byte budget are ever started ahead."""
    import random
    import threading
    import time

    from lorakit.formats.safetensors_writer import TensorSource
    from lorakit.ops.bake_io import prefetched

    rng = random.Random(0)
    live, peak, lock = [0], [0], threading.Lock()

    def make(i):
        def produce():
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            time.sleep(rng.random() * 0.004)
            return torch.full((1000,), float(i))  # 4000 bytes each

        return produce

    sources = [TensorSource(f"t{i:03d}", torch.float32, (1000,), make(i)) for i in range(60)]
    got = []
    with prefetched(sources, workers=2, budget=10_000) as ordered:
        for s in ordered:
            tensor = s.produce()
            with lock:
                live[0] -= 1
            got.append(int(tensor[0]))
    assert got == list(range(60))
    # the tensor taken, two more for the workers, then the budget (two 4000-byte tensors)
    assert peak[0] <= 1 + 2 + 2


def test_read_ahead_passes_a_worker_error_to_the_writer(tmp_path):
    from lorakit.formats.safetensors_writer import TensorSource
    from lorakit.ops.bake_io import prefetched, write_direct

    def broken():
        raise RuntimeError("cannot read tensor b")

    sources = [TensorSource.of("a", torch.zeros(10)), TensorSource("b", torch.float32, (10,), broken)]
    with pytest.raises(RuntimeError, match="tensor b"), prefetched(sources) as ordered:
        write_direct(tmp_path / "o.safetensors", ordered, None)
    assert list(tmp_path.iterdir()) == []


def test_in_place_bake_equals_the_copying_one():
    from lorakit.ops.bake import Contribution, baked_tensor

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 40, generator=g).half()
    patch = LoraPatch(up=torch.randn(300, 4, generator=g), down=torch.randn(4, 40, generator=g), alpha=2.0)
    c = [Contribution(Target("unet", "m"), patch, 0.7, None, None, None)]
    want = baked_tensor(w.clone(), c, torch.float16)
    owned = w.clone()
    got = baked_tensor(owned, c, torch.float16, in_place=True)
    assert got.data_ptr() == owned.data_ptr()
    assert torch.equal(got, want)
    ref = (w.float() + 0.7 * patch.delta(w.shape)).half()
    assert (got.float() - ref.float()).abs().max() <= 2e-3 * ref.float().abs().max()
