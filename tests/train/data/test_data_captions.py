"""Captions: keep tokens, shuffle, caption and tag dropout, trigger, determinism, files, tag frequency."""

from __future__ import annotations

import pytest
from data_helpers import kohya_dataset, make_image, write

from lorakit.train.data import DatasetConfig, FolderConfig, load_dataset
from lorakit.train.data.captions import epoch_caption, rng_for, split_tags

TAGS = "t0, t1, t2, t3, t4, t5, t6, t7, t8, t9"


def _caption(options: FolderConfig, seed=0, epoch=0, key="k", caption=TAGS, copy=0):
    return epoch_caption(caption, options, rng_for(seed, epoch, key, copy, "caption"))


def test_plain_caption_is_normalised_and_unchanged():
    assert _caption(FolderConfig(path="x"), caption=" a ,b,, c ") == "a, b, c"


def test_shuffle_keeps_leading_tokens_and_is_deterministic():
    options = FolderConfig(path="x", keep_tokens=2, shuffle_caption=True)
    captions = {_caption(options, epoch=e) for e in range(20)}
    assert len(captions) > 10
    for caption in captions:
        tags = split_tags(caption)
        assert tags[:2] == ["t0", "t1"] and sorted(tags[2:]) == sorted(split_tags(TAGS)[2:])
    assert _caption(options, seed=4, epoch=3, key="a") == _caption(options, seed=4, epoch=3, key="a")
    assert len({_caption(options, seed=s) for s in range(10)}) > 5
    assert len({_caption(options, key=k) for k in "abcdefgh"}) > 5


def test_caption_dropout_rate():
    assert _caption(FolderConfig(path="x", caption_dropout_rate=1.0, trigger="sks")) == ""
    options = FolderConfig(path="x", caption_dropout_rate=0.3)
    dropped = sum(_caption(options, key=str(i)) == "" for i in range(4000)) / 4000
    assert abs(dropped - 0.3) < 0.03


def test_tag_dropout_rate_spares_kept_tokens():
    options = FolderConfig(path="x", keep_tokens=1, tag_dropout_rate=1.0)
    assert _caption(options) == "t0"
    options = FolderConfig(path="x", keep_tokens=1, tag_dropout_rate=0.25)
    kept = [len(split_tags(_caption(options, key=str(i)))) - 1 for i in range(2000)]
    assert abs(sum(kept) / (2000 * 9) - 0.75) < 0.03
    assert all(_caption(options, key=str(i)).startswith("t0") for i in range(50))


def test_trigger_first_and_never_duplicated():
    options = FolderConfig(path="x", trigger="sks dog", keep_tokens=1, shuffle_caption=True)
    for epoch in range(10):
        tags = split_tags(_caption(options, epoch=epoch, caption="a photo, sks dog, grass, sun"))
        assert tags[0] == "sks dog" and tags.count("sks dog") == 1 and tags[1] == "a photo"
    assert _caption(FolderConfig(path="x", trigger="sks"), caption="") == "sks"


def test_other_separator():
    options = FolderConfig(path="x", caption_separator="|", trigger="tr")
    assert _caption(options, caption="a|b") == "tr| a| b"


def _load(root, **options):
    return load_dataset(DatasetConfig.for_folder(root, resolution=64, min_bucket_reso=64, **options))


def test_caption_files_class_tokens_and_precedence(tmp_path):
    root = tmp_path / "5_sks dog"
    for name in ("a", "b", "c", "d"):
        make_image(root / f"{name}.png", 64, 64, seed=ord(name))
    write(root / "a.txt", "from txt")
    write(root / "a.caption", "from caption")
    write(root / "b.caption", "only caption")
    write(root / "c.txt", "   \n")
    make_image(root / "e.png", 64, 64, seed=5)
    write(root / "e.txt", "")
    write(root / "e.caption", "the other file")
    images = _load(root)
    by_name = {item.path.stem: item for item in images.items}
    assert by_name["a"].caption == "from txt" and by_name["a"].caption_source == "a.txt"
    assert by_name["b"].caption == "only caption"
    assert by_name["c"].caption == "sks dog" and by_name["d"].caption == "sks dog"
    assert by_name["e"].caption == "the other file" and by_name["e"].caption_source == "e.caption"
    assert all(item.subset.repeats == 5 for item in images.items)
    flipped = {item.path.stem: item.caption for item in _load(root, caption_extension=".caption").items}
    assert flipped["a"] == "from caption"
    problems = {(p.path.split("/")[-1], p.problem.split(" ")[0]) for p in images.problems}
    assert ("a.caption", "differs") in problems and ("c.txt", "empty") in problems


def test_multiline_and_bom_caption(tmp_path):
    make_image(tmp_path / "d" / "a.png", 64, 64)
    (tmp_path / "d" / "a.txt").write_bytes("\ufeffa dog,\nred collar\n".encode())
    assert _load(tmp_path / "d").items[0].caption == "a dog, red collar"


def test_not_utf8_caption_is_an_error(tmp_path):
    make_image(tmp_path / "d" / "a.png", 64, 64)
    (tmp_path / "d" / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(Exception, match="UTF-8"):
        _load(tmp_path / "d")


def test_tag_frequency_has_kohya_shape(tmp_path):
    root = kohya_dataset(tmp_path / "train")
    write(root / "3_dog" / "d2.txt", "a dog, grass, grass")
    freq = _load(root, trigger="sks").tag_frequency()
    assert set(freq) == {"3_dog", "1_cat"}
    assert freq["3_dog"]["a dog"] == 3 and freq["3_dog"]["grass"] == 2 and freq["3_dog"]["dog"] == 1
    assert freq["3_dog"]["sks"] == 4 and freq["1_cat"] == {"sks": 2, "cat": 2}
    assert all(isinstance(v, int) for counts in freq.values() for v in counts.values())
