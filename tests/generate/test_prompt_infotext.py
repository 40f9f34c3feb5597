"""Prompt syntax <lora:name:w> (A1111 order and options), LoRA lookup by name, and A1111 infotext round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorakit.errors import ConfigError, InputError
from lorakit.generate import Infotext, format_infotext, format_lora_tag, parse_infotext, parse_prompt, resolve_lora


def test_tags_are_parsed_and_removed_from_the_text():
    text, refs = parse_prompt("a cat <lora:ink:0.8>, in snow <lora:film:0.5:1.2:lbw=MIDD> <lora:Plain>")
    assert text == "a cat, in snow"
    assert [(r.name, r.weight, r.text_encoder_weight, r.lbw) for r in refs] == [
        ("ink", 0.8, 0.8, None),
        ("film", 1.2, 0.5, "MIDD"),  # A1111 order: text encoder first, then the denoiser
        ("Plain", 1.0, 1.0, None),
    ]


def test_named_options_and_an_lbw_number_list():
    _, refs = parse_prompt("x <lora:a:te=0.25:unet=-1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>")
    assert (refs[0].weight, refs[0].text_encoder_weight) == (-1.0, 0.25)
    assert refs[0].lbw == "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a <lora:ink:0.8", "unclosed LoRA tag"),
        ("a <lora::0.8>", "name is empty"),
        ("a <lora:ink:strong>", "'strong' is not a number"),
        ("a <lora:ink:1:2:3>", "too many weights"),
        ("a <lora:ink:foo=1>", "unknown option 'foo'"),
        ("<lora:ink:1> <lora:ink:0.5>", "appears twice"),
        ("<lora:ink:lbw=MIDD:0.5>", "after a named option"),
    ],
)
def test_bad_syntax_is_a_one_line_error(prompt, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_prompt(prompt)
    assert "\n" not in str(info.value)


@given(
    name=st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True),
    weight=st.floats(-4, 4, allow_nan=False).map(lambda v: round(v, 3)),
    te=st.floats(-4, 4, allow_nan=False).map(lambda v: round(v, 3)),
)
def test_format_then_parse_round_trips(name, weight, te):
    text, refs = parse_prompt(f"a photo {format_lora_tag(name, weight, te)}")
    assert text == "a photo"
    assert (refs[0].name, refs[0].weight, refs[0].text_encoder_weight) == (name, weight, te)


def test_names_resolve_exactly_then_ignoring_case_with_close_matches_on_failure(tmp_path):
    (tmp_path / "sub").mkdir()
    for rel in ("Ink.safetensors", "ink.safetensors", "sub/FilmGrain.safetensors", "notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    assert resolve_lora("ink", tmp_path).name == "ink.safetensors"
    assert resolve_lora("filmgrain", tmp_path).name == "FilmGrain.safetensors"
    with pytest.raises(InputError, match="several files"):
        resolve_lora("INK", tmp_path)
    with pytest.raises(InputError, match="did you mean FilmGrain"):
        resolve_lora("FilmGrian", tmp_path)
    with pytest.raises(InputError, match="--lora-dir"):
        resolve_lora("ink", None)


A1111_TEXT = (
    "masterpiece, a cat, <lora:ink:0.8>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5, Lora hashes: "ink: 3c0a2f41b9d7, film: 0123456789ab", Version: v1.10.1'
)


def test_parses_a1111_text_and_writes_it_back_identically():
    info = parse_infotext(A1111_TEXT)
    assert info.prompt == "masterpiece, a cat, <lora:ink:0.8>"
    assert info.negative == "blurry, lowres"
    assert info.params["Seed"] == "1234" and info.params["Size"] == "512x768"
    assert info.lora_hashes() == {"ink": "3c0a2f41b9d7", "film": "0123456789ab"}
    assert format_infotext(info) == A1111_TEXT


@given(
    prompt=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1).filter(
        lambda s: s.strip() == s and not s.startswith("Negative prompt:")
    ),
    negative=st.text(st.characters(blacklist_categories=("Cs", "Cc"))).map(str.strip),
    sampler=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1).map(str.strip).filter(bool),
)
def test_infotext_round_trips(prompt, negative, sampler):
    info = Infotext(prompt, negative, {"Steps": "4", "Sampler": sampler, "CFG scale": "7", "Seed": "1"})
    back = parse_infotext(format_infotext(info))
    assert (back.prompt, back.negative, back.params) == (prompt, negative, info.params)
