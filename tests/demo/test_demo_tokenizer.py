"""The project's CLIP BPE files load in transformers' CLIPTokenizer (the oracle) and spell the captions as expected."""

from __future__ import annotations

import json

import pytest

from lorakit.demo import shapes
from lorakit.demo.tokenizer import BOS, EOS, bytes_to_unicode, learn_bpe, write_tokenizer_files

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    info = write_tokenizer_files(folder, [shapes.caption_for(s) for s in shapes.sample_specs(300, 0)])
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tok, info


def test_every_caption_word_is_one_token(tokenizer):
    tok, info = tokenizer
    assert tok.bos_token_id == info["bos_token_id"] and tok.eos_token_id == info["eos_token_id"]
    assert len(tok) == info["vocab_size"]
    ids = tok("a large red circle on the left, gray background").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        BOS,
        "a</w>",
        "large</w>",
        "red</w>",
        "circle</w>",
        "on</w>",
        "the</w>",
        "left</w>",
        ",</w>",
        "gray</w>",
        "background</w>",
        EOS,
    ]


def test_unknown_words_fall_back_to_pieces_and_decode(tokenizer):
    tok, _ = tokenizer
    ids = tok("a zkx, teal").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a zkx , teal"  # CLIP decodes </w> as a space


def test_padding_to_model_max_length(tokenizer):
    tok, _ = tokenizer
    out = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert len(out.input_ids[0]) == 32 and out.input_ids[0][-1] == tok.pad_token_id


def test_bpe_is_deterministic_and_bytes_map_is_a_bijection():
    texts = ["a red circle", "a green square", "a red square"]
    assert learn_bpe(texts) == learn_bpe(list(reversed(texts)))
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256 and table[ord("a")] == "a"
