"""Latent and text-embedding caches: hits, misses, invalidation on image or settings change, disk, refusals."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from data_helpers import folder_hash, kohya_dataset, make_image

from lorakit.errors import ConfigError
from lorakit.train.data import BatchLoader, DatasetConfig, LatentCache, TextEmbeddingCache, load_dataset

SMALL = dict(resolution=64, bucket_reso_steps=16, min_bucket_reso=32, max_bucket_reso=128)


class FakeVae:
    """A deterministic stand-in for a VAE encoder: 8x average pool, then a fixed 3 -> 4 channel map."""

    def __init__(self, seed: int = 0) -> None:
        self.weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += pixels.shape[0]
        return torch.einsum("oc,bchw->bohw", self.weight, F.avg_pool2d(pixels, 8))


def _images(root, **options):
    return load_dataset(DatasetConfig.for_folder(root, **{**SMALL, **options}))


@pytest.fixture
def data_root(tmp_path):
    return kohya_dataset(tmp_path / "train")


@pytest.mark.parametrize("on_disk", [False, True])
def test_latents_match_direct_encoding_and_are_encoded_once(data_root, tmp_path, on_disk):
    images = _images(data_root, flip=True)
    vae = FakeVae()
    folder = tmp_path / "cache" if on_disk else None
    cache = LatentCache(vae, identity="vae-a", folder=folder, images=images)
    loader = BatchLoader(images, 2, seed=0)
    for epoch in range(3):
        for batch in loader.batches(epoch):
            latents = cache.latents(batch)
            direct = torch.stack([FakeVae()(s.pixels[None])[0] for s in batch])
            torch.testing.assert_close(latents, direct, rtol=0, atol=0)
    # 6 images x {plain, flipped} at most, never more, however many epochs
    assert cache.encoded == vae.calls <= 12
    assert len(cache) == cache.encoded
    if on_disk:
        again = LatentCache(FakeVae(), identity="vae-a", folder=folder, images=images)
        batch = next(loader.batches(0))
        torch.testing.assert_close(again.latents(batch), cache.latents(batch), rtol=0, atol=0)
        assert again.encoded == 0


def test_changed_image_or_settings_invalidate(data_root, tmp_path):
    folder = tmp_path / "cache"
    images = _images(data_root)
    first = LatentCache(FakeVae(), identity="vae-a", folder=folder, images=images)
    first.precompute(images, batch_size=2)
    assert first.encoded == len(images)

    same = LatentCache(FakeVae(), identity="vae-a", folder=folder, images=images)
    assert same.precompute(images) == 0

    other_vae = LatentCache(FakeVae(seed=1), identity="vae-b", folder=folder, images=images)
    assert other_vae.precompute(images) == len(images)

    bigger = _images(data_root, resolution=80)  # other buckets -> other keys
    assert LatentCache(FakeVae(), identity="vae-a", folder=folder, images=bigger).precompute(bigger) > 0

    old = next(i for i, it in enumerate(images.items) if it.key.endswith("d2.png"))
    old_latent = same.latents([images.view_sample(old)])
    make_image(data_root / "3_dog" / "d2.png", 64, 64, seed=1234)  # same name, same size, new picture
    changed = _images(data_root)
    cache = LatentCache(FakeVae(), identity="vae-a", folder=folder, images=changed)
    assert cache.precompute(changed) == 1
    new_latent = cache.latents([changed.view_sample(old)])
    assert not torch.equal(old_latent, new_latent)
    torch.testing.assert_close(new_latent, FakeVae()(changed.view_sample(old).pixels[None]), rtol=0, atol=0)


def test_flip_is_cached_per_variant(data_root):
    images = _images(data_root, flip=True)
    cache = LatentCache(FakeVae(), identity="v", images=images)
    assert cache.precompute(images, batch_size=3) == 2 * len(images)
    plain, mirrored = images.view_sample(0), images.view_sample(0, flip=True)
    assert cache.key(plain) != cache.key(mirrored)
    torch.testing.assert_close(cache.latents([mirrored]), FakeVae()(mirrored.pixels[None]), rtol=0, atol=0)
    loader = BatchLoader(images, 2, seed=0)
    for batch in loader.batches(0):
        cache.latents(batch)
    assert cache.encoded == 2 * len(images)


def test_refusals(data_root, tmp_path):
    with pytest.raises(ConfigError, match="random_crop"):
        LatentCache(FakeVae(), identity="v", images=_images(data_root, random_crop=True))
    images = _images(data_root)
    with pytest.raises(ConfigError, match="inside the dataset folder"):
        LatentCache(FakeVae(), identity="v", folder=data_root / "cache", images=images)
    with pytest.raises(ConfigError, match="inside the dataset folder"):
        TextEmbeddingCache(lambda c: torch.zeros(len(c), 2), identity="t", folder=data_root / "3_dog", images=images)
    with pytest.raises(ConfigError, match="identity"):
        LatentCache(FakeVae(), identity="")


def test_damaged_cache_file_is_encoded_again(data_root, tmp_path):
    folder = tmp_path / "cache"
    images = _images(data_root)
    cache = LatentCache(FakeVae(), identity="v", folder=folder, images=images)
    sample = images.view_sample(0)
    good = cache.latents([sample])
    path = folder / f"{cache.key(sample)}.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    again = LatentCache(FakeVae(), identity="v", folder=folder, images=images)
    torch.testing.assert_close(again.latents([sample]), good, rtol=0, atol=0)
    assert again.encoded == 1


def test_cache_never_writes_into_the_dataset(data_root, tmp_path):
    before = folder_hash(data_root)
    images = _images(data_root, flip=True)
    LatentCache(FakeVae(), identity="v", folder=tmp_path / "c", images=images).precompute(images)
    assert folder_hash(data_root) == before


def test_text_embedding_cache_tensor_and_mapping(tmp_path):
    calls = []

    def encode(captions):
        calls.extend(captions)
        codes = torch.tensor([[float(len(c)), float(sum(map(ord, c)) % 97)] for c in captions])
        return {"hidden": codes[:, None, :].repeat(1, 3, 1), "pooled": codes * 2}

    cache = TextEmbeddingCache(encode, identity="te-1", folder=tmp_path / "te")
    out = cache.embeddings(["a dog", "a cat", "a dog"])
    assert out["hidden"].shape == (3, 3, 2) and out["pooled"].shape == (3, 2)
    torch.testing.assert_close(out["pooled"][0], out["pooled"][2])
    assert calls == ["a dog", "a cat"]
    again = TextEmbeddingCache(encode, identity="te-1", folder=tmp_path / "te")
    torch.testing.assert_close(again.embeddings(["a cat"])["pooled"], encode(["a cat"])["pooled"])
    assert again.encoded == 0
    other = TextEmbeddingCache(encode, identity="te-2", folder=tmp_path / "te")
    other.embeddings(["a cat"])
    assert other.encoded == 1

    plain = TextEmbeddingCache(lambda c: torch.ones(len(c), 5) * len(c[0]), identity="x")
    assert plain.embeddings(["ab", "ab"]).shape == (2, 5) and plain.encoded == 1


def test_copied_dataset_reuses_the_cache(data_root, tmp_path):
    # keys depend on content, not on where the folder is
    images = _images(data_root)
    cache = LatentCache(FakeVae(), identity="v", folder=tmp_path / "c", images=images)
    cache.precompute(images)
    moved = shutil.copytree(data_root, tmp_path / "elsewhere" / "train")
    copy = _images(moved)
    assert LatentCache(FakeVae(), identity="v", folder=tmp_path / "c", images=copy).precompute(copy) == 0


def test_cache_hits_never_decode_images(data_root):
    images = _images(data_root, flip=True)
    cache = LatentCache(FakeVae(), identity="v", images=images)
    cache.precompute(images)
    for batch in BatchLoader(images, 2, seed=0).batches(0):
        cache.latents(batch)
        assert not any(sample.loaded for sample in batch)
    fresh = next(BatchLoader(images, 2, seed=0).batches(0))
    LatentCache(FakeVae(), identity="other", images=images).latents(fresh)
    assert all(sample.loaded for sample in fresh)
