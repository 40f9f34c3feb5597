"""check_dataset and load_dataset on broken datasets: every kind of problem, its severity, and no writes."""

from __future__ import annotations

from collections import Counter

import pytest
from data_helpers import folder_hash, kohya_dataset, make_image, write
from PIL import Image

from lorakit.errors import InputError
from lorakit.train.data import DatasetConfig, FolderConfig, load_dataset
from lorakit.train.data.buckets import BucketChooser
from lorakit.train.data.check import check_dataset


def _check(root, **options):
    return check_dataset(DatasetConfig.for_folder(root, **options))


def _found(report):
    """{(last two path parts, first words of the problem): severity}."""
    return {("/".join(p.path.split("/")[-2:]), p.problem[:24]): p.severity for p in report.problems}


def _has(report, path_end, words, severity):
    hits = [p for p in report.problems if p.path.endswith(path_end) and words in p.problem]
    assert hits, f"no {severity} '{words}' for {path_end}; got {_found(report)}"
    assert all(p.severity == severity for p in hits), hits
    assert all(p.fix for p in hits)


def test_clean_dataset_has_no_problems_and_a_bucket_preview(tmp_path):
    root = tmp_path / "train"
    for i, (w, h) in enumerate([(512, 512), (640, 384), (384, 640), (600, 600), (768, 512)]):
        make_image(root / "4_dog" / f"{i}.png", w, h, seed=i)
    report = _check(root, resolution=512)
    assert report.problems == [] and report.errors == 0
    assert report.images == 5 and report.per_epoch == 20
    # independent: each image's bucket from the chooser, counted by hand
    chooser = BucketChooser(512)
    expected = Counter(
        chooser.choose(w, h).bucket for w, h in [(512, 512), (640, 384), (384, 640), (600, 600), (768, 512)]
    )
    assert {(r.width, r.height): r.images for r in report.buckets} == dict(expected)
    assert all(r.per_epoch == 4 * r.images for r in report.buckets)


def test_file_problems(tmp_path):
    root = tmp_path / "imgs"
    make_image(root / "ok.png", 512, 512, seed=1)
    write(root / "ok.txt", "a dog")
    make_image(root / "nocap.png", 512, 512, seed=2)
    make_image(root / "empty.png", 512, 512, seed=3)
    write(root / "empty.txt", "  ")
    for name in ("trunc.png", "trunc.jpg"):
        path = make_image(root / name, 512, 512, seed=4)
        path.write_bytes(path.read_bytes()[:1500])
    (root / "text.png").write_text("not an image")
    make_image(root / "tiny.png", 20, 20, seed=5)
    make_image(root / "small.png", 200, 200, seed=6)
    make_image(root / "wide.png", 640, 64, seed=7)
    make_image(root / "dup.png", 512, 512, seed=1)
    Image.open(make_image(root / "near.png", 512, 512, seed=8)).save(root / "near_copy.jpg", quality=92)
    make_image(root / "twin.png", 512, 512, seed=9)
    make_image(root / "twin.jpg", 512, 512, seed=10, quality=95)
    write(root / "notes.md", "x")
    make_image(root / "anim.gif", 32, 32, seed=11)
    write(root / "old.npz", "x")
    write(root / "orphan.txt", "a cat")
    report = _check(root, resolution=512)
    _has(report, "nocap.png", "no caption file", "warning")
    _has(report, "empty.txt", "empty caption file", "warning")
    _has(report, "trunc.png", "not a readable image", "error")
    _has(report, "trunc.jpg", "not a readable image", "error")
    _has(report, "text.png", "not a readable image", "error")
    _has(report, "tiny.png", "tiny image", "error")
    _has(report, "small.png", "enlarged 2.6x", "warning")
    _has(report, "wide.png", "cropped away", "warning")
    _has(report, "ok.png", "exact duplicate of imgs/dup.png", "warning")  # the later name is reported
    _has(report, "near_copy.jpg", "near duplicate of imgs/near.png", "warning")
    _has(report, "twin.txt", "share one caption name", "warning")
    _has(report, "notes.md", "not an image or caption", "warning")
    _has(report, "anim.gif", ".gif images are not used", "warning")
    _has(report, "old.npz", "latent cache", "warning")
    _has(report, "orphan.txt", "without an image", "warning")
    assert report.errors == 4
    # near duplicates are only the intended pair
    assert sum("near duplicate" in p.problem for p in report.problems) == 1
    assert [p.severity for p in report.problems] == sorted(p.severity for p in report.problems)


def test_folder_name_mistakes(tmp_path):
    root = tmp_path / "train"
    make_image(root / "3_dog" / "a.png", 64, 64, seed=1)
    make_image(root / "10 dog" / "a.png", 64, 64, seed=2)
    make_image(root / "x_cat" / "a.png", 64, 64, seed=3)
    make_image(root / "cat_5" / "a.png", 64, 64, seed=4)
    make_image(root / "010_bird" / "a.png", 64, 64, seed=5)
    make_image(root / "5_" / "a.png", 64, 64, seed=6)
    make_image(root / "0_fish" / "a.png", 64, 64, seed=7)
    make_image(root / "3_dog" / "more" / "b.png", 64, 64, seed=8)
    make_image(root / "loose.png", 64, 64, seed=9)
    (root / "empty_folder").mkdir()
    report = _check(root, resolution=64, min_bucket_reso=64)
    _has(report, "10 dog", "not named N_name", "error")
    assert any("10_dog" in p.fix for p in report.problems)
    _has(report, "x_cat", "without a repeat count", "error")
    assert any("1_cat" in p.fix for p in report.problems)
    _has(report, "cat_5", "repeat count is at the end", "error")
    assert any("5_cat" in p.fix for p in report.problems)
    _has(report, "010_bird", "leading zero", "warning")
    _has(report, "5_", "no class tokens", "warning")
    _has(report, "0_fish", "0 repeats", "error")
    _has(report, "3_dog/more", "not used", "warning")
    _has(report, "train", "directly in a parent", "error")
    assert not any("empty_folder" in p.path for p in report.problems)
    used = {(r.width, r.height): r.per_epoch for r in report.buckets}
    assert used == {(64, 64): 3 + 10 + 5}


def test_pointing_one_level_too_high(tmp_path):
    make_image(tmp_path / "train" / "img" / "10_dog" / "a.png", 64, 64)
    report = _check(tmp_path / "train", resolution=64, min_bucket_reso=64)
    _has(report, "train", "no images", "error")
    assert "img instead" in report.problems[0].fix


def test_plain_folder_named_like_a_repeat_folder(tmp_path):
    make_image(tmp_path / "7_sks dog" / "a.png", 64, 64)
    images = load_dataset(DatasetConfig.for_folder(tmp_path / "7_sks dog", resolution=64, min_bucket_reso=64))
    assert images.items[0].subset.repeats == 7 and images.items[0].caption == "sks dog"
    assert images.items[0].key == "7_sks dog/a.png"
    config = DatasetConfig(
        folders=(FolderConfig(path=str(tmp_path / "7_sks dog"), repeats=2, class_tokens="x"),),
        resolution=64,
        min_bucket_reso=64,
    )
    item = load_dataset(config).items[0]
    assert item.subset.repeats == 2 and item.caption == "x"


def test_load_dataset_refuses_errors_with_the_first_problem(tmp_path):
    root = kohya_dataset(tmp_path / "train")
    broken = root / "3_dog" / "d0.png"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(InputError, match=r"d0.png: not a readable image.*lorakit dataset check"):
        load_dataset(DatasetConfig.for_folder(root, resolution=64, min_bucket_reso=64))
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(DatasetConfig.for_folder(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_dataset(DatasetConfig.for_folder(tmp_path / "empty"))
    with pytest.raises(InputError, match="does not exist"):
        check_dataset(DatasetConfig.for_folder(tmp_path / "missing"))


def test_same_folder_name_twice_is_an_error(tmp_path):
    make_image(tmp_path / "a" / "dog" / "x.png", 64, 64, seed=1)
    make_image(tmp_path / "b" / "dog" / "x.png", 64, 64, seed=2)
    config = DatasetConfig(
        folders=(FolderConfig(path=str(tmp_path / "a" / "dog")), FolderConfig(path=str(tmp_path / "b" / "dog"))),
        resolution=64,
        min_bucket_reso=64,
    )
    with pytest.raises(InputError, match="same key"):
        load_dataset(config)


def test_check_never_writes(tmp_path):
    root = kohya_dataset(tmp_path / "train")
    write(root / "3_dog" / "junk.md", "x")
    before = folder_hash(root)
    _check(root, resolution=64, min_bucket_reso=64)
    assert folder_hash(root) == before
