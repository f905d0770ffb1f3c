"""The optional content clean-up: NFKC and no bidi controls or zero-width characters, applied to every field."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from classification.content import Chat, PromptResponse, Text, Turn
from classification.normalise import BIDI_CONTROLS, ZERO_WIDTH, normalise_content, normalise_text

ISSUE_BIDI = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)]


@pytest.mark.parametrize(("given_text", "expected"), [
    ("plain words", "plain words"),
    ("ｂａｎａｎａ", "banana"),  # fullwidth letters
    ("ban\u200bana", "banana"),  # a zero-width space inside a word
    ("ba\u200cna\u200dna\u2060", "banana"),
    ("\u202eananab\u202c", "ananab"),  # a right-to-left override shows this reversed; the model reads the letters
    ("\ufb01ne", "fine"),  # the "fi" ligature
    ("e\u200b\u0301", "\u00e9"),  # removed first, so NFKC composes what the invisible character kept apart
    ("\ufeffleading bom", "leading bom"),
])
def test_normalise_text(given_text, expected):
    assert normalise_text(given_text) == expected


def test_every_bidi_control_the_issue_names_is_removed():
    assert set(ISSUE_BIDI) <= set(BIDI_CONTROLS)
    assert normalise_text("a".join(ISSUE_BIDI)) == "a" * (len(ISSUE_BIDI) - 1)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.one_of(st.characters(), st.sampled_from(BIDI_CONTROLS + ZERO_WIDTH))))
def test_the_result_is_nfkc_free_of_invisible_characters_and_stable(text):
    once = normalise_text(text)
    assert unicodedata.is_normalized("NFKC", once)
    assert not set(once) & set(BIDI_CONTROLS + ZERO_WIDTH)
    assert normalise_text(once) == once


def test_every_field_of_every_kind_is_normalised_and_roles_kept():
    assert normalise_content(Text("ｘ\u200b")) == Text("x")
    assert normalise_content(PromptResponse("ｐ\u202e", "ｒ\u2066")) == PromptResponse("p", "r")
    chat = Chat((Turn("user", "ｕ"), Turn("assistant", "a\u200fb")))
    assert normalise_content(chat) == Chat((Turn("user", "u"), Turn("assistant", "ab")))
