"""Verdicts: each status, each tolerated or rejected deviation of the output formats, and property tests that any
token stream yields one of the five statuses without raising."""

from __future__ import annotations

import json
from typing import Any

import pytest
from harmony_tokens import build, rendered
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_harmony import HarmonyEncoding

from classification.completion import Message, ParsedCompletion, parse_completion
from classification.policy import OutputSpec
from classification.tokens import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    END_OF_TEXT,
    FIRST_SPECIAL,
    MESSAGE,
    RETURN,
    START,
    START_OF_TEXT,
    VOCAB_SIZE,
)
from classification.verdict import (
    EXTRA_MESSAGES,
    MALFORMED,
    MISSING_FINAL,
    OK,
    STATUSES,
    TRUNCATED,
    Verdict,
    parse_verdict,
)
from classification.vocab import load_harmony_encoding

BINARY = OutputSpec("binary")
PLAIN_JSON = OutputSpec("json")
CATEGORIZED = OutputSpec("json", categories=("VE1", "VE2"), rule_ids=("VE1.a", "VE1.b", "VE2.a"))
FULL = OutputSpec("json", categories=("VE1", "VE2"), rule_ids=("VE1.a", "VE1.b", "VE2.a"), confidence=True,
                  rationale=True)
FINISH_REASONS = ("stop", "length", "cancelled", "error")
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="session")
def encoding() -> HarmonyEncoding:
    return load_harmony_encoding()


def completion(encoding: HarmonyEncoding, final: str, analysis: str | None = "Reasoning.") -> list[int]:
    return rendered(encoding, analysis, final)


def verdict_of(encoding: HarmonyEncoding, tokens: list[int], output: OutputSpec = BINARY,
               finish_reason: str = "stop") -> Verdict:
    return parse_verdict(parse_completion(tokens, encoding.decode), output, finish_reason)


def check_contract(verdict: Verdict) -> None:
    assert verdict.status in STATUSES
    assert "internal error" not in verdict.detail
    assert (verdict.violation is not None) == (verdict.status in (OK, EXTRA_MESSAGES))
    assert (verdict.detail == "") == (verdict.status == OK)
    assert len(verdict.detail) < 1000


# Binary format.

@pytest.mark.parametrize(("text", "violation"), [("0", False), ("1", True), (" 1\n", True), ("\n0\n\n", False),
                                                 ("1.", True), ("0. ", False)])
def test_binary_accepted(encoding: HarmonyEncoding, text: str, violation: bool) -> None:
    verdict = verdict_of(encoding, completion(encoding, text, "The content is spam."))
    assert (verdict.status, verdict.violation, verdict.final_text) == (OK, violation, text)
    assert verdict.analysis == "The content is spam." and verdict.detail == ""
    check_contract(verdict)


@pytest.mark.parametrize("text", ["", "  ", "2", "01", "1..", "1 0", "yes", "**1**", '"1"', "1 (spam)",
                                  '{"violation": 1}', "`1`", "1\n\nBecause it is spam.", "١"])
def test_binary_rejected(encoding: HarmonyEncoding, text: str) -> None:
    verdict = verdict_of(encoding, completion(encoding, text))
    assert (verdict.status, verdict.violation, verdict.final_text) == (MALFORMED, None, text)
    assert "expected 0 or 1" in verdict.detail
    check_contract(verdict)


# JSON format: (final text, output spec, expected fields) for accepted answers.
ACCEPTED_JSON: list[tuple[str, OutputSpec, dict[str, Any]]] = [
    ('{"violation": 0, "policy_category": null}', PLAIN_JSON, {"violation": False, "category": None}),
    ('{"violation": 0}', CATEGORIZED, {"violation": False, "category": None, "rule_ids": ()}),
    ('{"violation": false}', PLAIN_JSON, {"violation": False}),
    ('{"violation": true, "policy_category": "anything"}', PLAIN_JSON, {"violation": True, "category": "anything"}),
    ('{"violation": 1}', PLAIN_JSON, {"violation": True, "category": None}),
    ('{"violation": 1, "policy_category": "VE2", "rule_ids": ["VE2.a"]}', CATEGORIZED,
     {"violation": True, "category": "VE2", "rule_ids": ("VE2.a",)}),
    ('{"violation": 1, "policy_category": "VE1"}', CATEGORIZED, {"rule_ids": ()}),
    ('{"violation": 1, "policy_category": "VE1", "rule_ids": ["VE1.b", "VE1.a", "VE1.b"]}', CATEGORIZED,
     {"rule_ids": ("VE1.b", "VE1.a")}),
    ('{"violation": 0, "rule_ids": []}', CATEGORIZED, {"rule_ids": ()}),
    ('{"violation": 1, "policy_category": "H2.f", "rule_ids": ["H2.d", "H2.f"]}', PLAIN_JSON,
     {"category": "H2.f", "rule_ids": ("H2.d", "H2.f")}),
    ('{"violation": 1, "policy_category": "VE1", "rule_ids": ["VE1.a"], "confidence": "high", '
     '"rationale": "Praises an attack."}', FULL,
     {"violation": True, "category": "VE1", "rule_ids": ("VE1.a",), "confidence": "high",
      "rationale": "Praises an attack."}),
    ('{"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "Low"}', FULL,
     {"confidence": "low", "rationale": None}),
    ('{"violation": 0, "confidence": "medium", "rationale": ["News report.", "No endorsement."]}', FULL,
     {"rationale": "News report.\nNo endorsement."}),
    ('{"violation": 0, "confidence": "certain", "rationale": 7}', PLAIN_JSON, {"confidence": None, "rationale": None}),
    ('{"violation": 0, "rationale": "fine", "extra": {"ignored": true}}', PLAIN_JSON, {"rationale": "fine"}),
    ('```json\n{"violation": 1, "policy_category": "VE1"}\n```', CATEGORIZED, {"category": "VE1"}),
    ('  ```JSON\n{"violation": 0}\n```\n', PLAIN_JSON, {"violation": False}),
    ('```\n{"violation": 0}\n```', PLAIN_JSON, {"violation": False}),
    ('\n  {\n  "violation": 1,\n  "policy_category": "VE2"\n}\n', CATEGORIZED, {"category": "VE2"}),
]


@pytest.mark.parametrize(("text", "output", "expected"), ACCEPTED_JSON)
def test_json_accepted(encoding: HarmonyEncoding, text: str, output: OutputSpec, expected: dict[str, Any]) -> None:
    verdict = verdict_of(encoding, completion(encoding, text), output)
    assert verdict.status == OK, verdict.detail
    assert {key: getattr(verdict, key) for key in expected} == expected
    assert verdict.final_text == text
    check_contract(verdict)


# (final text, output spec, a phrase the detail must hold) for rejected answers.
REJECTED_JSON: list[tuple[str, OutputSpec, str]] = [
    ("1", PLAIN_JSON, "not an object"),
    ("[1]", PLAIN_JSON, "not an object"),
    ("", PLAIN_JSON, "not one JSON object"),
    ("violation: 1", PLAIN_JSON, "not one JSON object"),
    ('{"violation": 1,}', PLAIN_JSON, "not one JSON object"),
    ('{"violation": 1} because it praises violence', PLAIN_JSON, "not one JSON object"),
    ('Answer: {"violation": 1}', PLAIN_JSON, "not one JSON object"),
    ('{"violation": 1}\n{"violation": 0}', PLAIN_JSON, "not one JSON object"),
    ('```json\n{"violation": 1}\n``` done', PLAIN_JSON, "not one JSON object"),
    ('```python\n{"violation": 1}\n```', PLAIN_JSON, "not one JSON object"),
    ('{"violation": 1, "violation": 0}', PLAIN_JSON, "repeated key"),
    ('{"policy_category": null}', PLAIN_JSON, 'no "violation"'),
    ('{"violation": "1"}', PLAIN_JSON, '"violation" must be'),
    ('{"violation": 1.0}', PLAIN_JSON, '"violation" must be'),
    ('{"violation": 2}', PLAIN_JSON, '"violation" must be'),
    ('{"violation": null}', PLAIN_JSON, '"violation" must be'),
    ('{"violation": 1}', CATEGORIZED, '"policy_category" must be one of VE1, VE2; got none'),
    ('{"violation": 1, "policy_category": null}', CATEGORIZED, "got none"),
    ('{"violation": 1, "policy_category": "VE9"}', CATEGORIZED, "got 'VE9'"),
    ('{"violation": 1, "policy_category": "ve1"}', CATEGORIZED, "got 've1'"),
    ('{"violation": 1, "policy_category": 3}', PLAIN_JSON, '"policy_category" must be a string'),
    ('{"violation": 0, "policy_category": "VE1"}', CATEGORIZED, 'but "violation" is 0'),
    ('{"violation": 0, "policy_category": "none"}', PLAIN_JSON, 'but "violation" is 0'),
    ('{"violation": 1, "policy_category": "VE1", "rule_ids": ["VE7.z"]}', CATEGORIZED, "undeclared ids 'VE7.z'"),
    ('{"violation": 1, "policy_category": "VE1", "rule_ids": "VE1.a"}', CATEGORIZED, "must be a list of strings"),
    ('{"violation": 1, "policy_category": "VE1", "rule_ids": [1]}', CATEGORIZED, "must be a list of strings"),
    ('{"violation": 0, "rule_ids": ["VE1.a"]}', CATEGORIZED, 'but "violation" is 0'),
    ('{"violation": 0, "rationale": "fine"}', FULL, '"confidence" must be one of low, medium, high; got none'),
    ('{"violation": 0, "confidence": "very high"}', FULL, "got '\"very high\"'"),
    ('{"violation": 0, "confidence": 0.9}', FULL, "got '0.9'"),
    ('{"violation": 0, "confidence": "low", "rationale": {"a": 1}}', FULL, '"rationale" must be a string'),
    ('{"violation": 0, "confidence": "low", "rationale": ["ok", 2]}', FULL, '"rationale" must be a string'),
]


@pytest.mark.parametrize(("text", "output", "phrase"), REJECTED_JSON, ids=lambda value: str(value)[:40])
def test_json_rejected(encoding: HarmonyEncoding, text: str, output: OutputSpec, phrase: str) -> None:
    verdict = verdict_of(encoding, completion(encoding, text), output)
    assert (verdict.status, verdict.violation, verdict.final_text) == (MALFORMED, None, text)
    assert phrase in verdict.detail
    assert len(verdict.detail) < 300
    check_contract(verdict)


def test_deeply_nested_json_is_malformed() -> None:
    # Built without the tokenizer: BPE over 200,000 brackets takes seconds, the verdict well under one.
    text = "[" * 100_000 + "]" * 100_000
    final = Message("assistant", "final", None, None, text, "<|return|>", 0, 1)
    verdict = parse_verdict(ParsedCompletion((final,), (), RETURN, (), 1), PLAIN_JSON, "stop")
    assert (verdict.status, verdict.detail) == (MALFORMED, "final text nests JSON too deeply")


# Statuses other than ok and malformed.

def test_truncated_by_length_in_the_analysis(encoding: HarmonyEncoding) -> None:
    tokens = completion(encoding, "1", "The content asks for")[:-8]
    verdict = verdict_of(encoding, tokens, finish_reason="length")
    assert (verdict.status, verdict.violation, verdict.final_text) == (TRUNCATED, None, "")
    assert verdict.analysis.startswith("The content") and "length" in verdict.detail
    check_contract(verdict)


def test_truncated_inside_the_final_keeps_the_partial_text(encoding: HarmonyEncoding) -> None:
    tokens = completion(encoding, '{"violation": 1, "policy_category": "VE1"}')[:-4]
    verdict = verdict_of(encoding, tokens, CATEGORIZED, "length")
    assert verdict.status == TRUNCATED and verdict.final_text.startswith('{"violation": 1')
    assert verdict.analysis == "Reasoning." and "inside the final message" in verdict.detail
    check_contract(verdict)


@pytest.mark.parametrize("finish_reason", ["cancelled", "error", ""])
def test_other_early_finishes_are_truncated(encoding: HarmonyEncoding, finish_reason: str) -> None:
    verdict = verdict_of(encoding, completion(encoding, "1")[:-1], finish_reason=finish_reason)
    assert verdict.status == TRUNCATED and verdict.final_text == "1"


def test_length_after_a_complete_final_is_not_truncation(encoding: HarmonyEncoding) -> None:
    assert verdict_of(encoding, completion(encoding, "1"), finish_reason="length").status == OK
    ended = build(encoding, CHANNEL, "final", MESSAGE, "1", END)
    assert verdict_of(encoding, ended, finish_reason="length").status == OK


def test_stop_token_dropped_by_the_engine_is_ok(encoding: HarmonyEncoding) -> None:
    verdict = verdict_of(encoding, completion(encoding, "0")[:-1])
    assert (verdict.status, verdict.violation) == (OK, False)


@pytest.mark.parametrize(("tokens", "phrase"), [
    ((CHANNEL, "analysis", MESSAGE, "Thinking", RETURN), "got assistant/analysis"),
    ((CHANNEL, "analysis", MESSAGE, "Thinking", END, START, "assistant", CHANNEL, "final", RETURN),
     "got assistant/analysis"),
    ((), "no message"),
    ((CHANNEL, "commentary", MESSAGE, "1", RETURN), "assistant/commentary"),
    ((CHANNEL, "analysis", MESSAGE, "a", END, START, "user", CHANNEL, "final", MESSAGE, "1", RETURN), "user/final"),
])
def test_missing_final(encoding: HarmonyEncoding, tokens: tuple, phrase: str) -> None:
    verdict = verdict_of(encoding, build(encoding, *tokens))
    assert (verdict.status, verdict.violation, verdict.final_text) == (MISSING_FINAL, None, "")
    assert phrase in verdict.detail
    check_contract(verdict)


def test_missing_final_keeps_the_analysis(encoding: HarmonyEncoding) -> None:
    verdict = verdict_of(encoding, build(encoding, CHANNEL, "analysis", MESSAGE, "Thinking", END))
    assert verdict.status == MISSING_FINAL and verdict.analysis == "Thinking"


def _final(text: str) -> tuple:
    return (START, "assistant", CHANNEL, "final", MESSAGE, text)


@pytest.mark.parametrize(("tokens", "violation", "phrase"), [
    # A second final: the verdict comes from the last one.
    ((CHANNEL, "final", MESSAGE, "0", END, *_final("1"), RETURN), True, "message before the final one"),
    ((CHANNEL, "analysis", MESSAGE, "a", END, START, "assistant", CHANNEL, "commentary", MESSAGE, "b", END,
      *_final("1"), RETURN), True, "assistant/commentary message before"),
    ((CHANNEL, "analysis", MESSAGE, "a", END, START, "assistant", CHANNEL, "analysis", MESSAGE, "b", END,
      *_final("0"), RETURN), False, "2 analysis messages"),
    ((CHANNEL, "final", MESSAGE, "1", END, START, "assistant", CHANNEL, "analysis", MESSAGE, "more", END),
     True, "message after the final one"),
    ((CHANNEL, "commentary to=functions.lookup ", CONSTRAIN, "json", MESSAGE, "{}", END, *_final("0"), RETURN),
     False, "to=functions.lookup"),
    ((CHANNEL, "final to=functions.lookup", MESSAGE, "1", CALL), True, "addressed to functions.lookup"),
    ((CHANNEL, "final", MESSAGE, "1", CALL), True, "ends with <|call|>"),
    ((CHANNEL, "analysis", MESSAGE, "a", START_OF_TEXT, "b", END, *_final("1"), RETURN), True, "unexpected_special"),
    ((CHANNEL, "analysis", MESSAGE, "a", *_final("1"), RETURN), True, "unterminated_message"),
    ((CHANNEL, "analysis", MESSAGE, "a", END, "stray", *_final("0"), RETURN), False, "stray_token"),
    ((CHANNEL, "analysis", MESSAGE, "a", END, START, END, *_final("0"), RETURN), False, "unclosed_header"),
    ((CHANNEL, "final", MESSAGE, "1", RETURN, "after", END_OF_TEXT), True, "1 tokens after <|return|>"),
    ((CHANNEL, "final", MESSAGE, "1", -7, RETURN), True, "invalid_token"),
])
def test_extra_messages_still_carry_the_verdict(encoding: HarmonyEncoding, tokens: tuple, violation: bool,
                                                phrase: str) -> None:
    verdict = verdict_of(encoding, build(encoding, *tokens))
    assert (verdict.status, verdict.violation) == (EXTRA_MESSAGES, violation)
    assert phrase in verdict.detail
    check_contract(verdict)


def test_runaway_completions_keep_the_detail_short(encoding: HarmonyEncoding) -> None:
    chatter = (START, "assistant", CHANNEL, "commentary", MESSAGE, "x", END) * 50
    extra = verdict_of(encoding, build(encoding, CHANNEL, "analysis", MESSAGE, "a", END, *chatter, *_final("1"),
                                       RETURN))
    assert extra.status == EXTRA_MESSAGES
    assert extra.detail == "assistant/commentary message before the final one (x50)"
    noisy = (CHANNEL, "analysis", MESSAGE, "a", END, *(START, -1, END) * 30, *_final("1"), RETURN)
    assert verdict_of(encoding, build(encoding, *noisy)).detail.endswith("(and 59 more)")
    missing = verdict_of(encoding, build(encoding, CHANNEL, "commentary " + "word " * 500, END, *chatter))
    assert missing.status == MISSING_FINAL and missing.detail == "no final message; got assistant/commentary (x50)"
    check_contract(extra)
    check_contract(missing)


def test_endoftext_padding_after_the_stop_token_is_ignored(encoding: HarmonyEncoding) -> None:
    verdict = verdict_of(encoding, [*completion(encoding, "1"), END_OF_TEXT, END_OF_TEXT])
    assert (verdict.status, verdict.violation) == (OK, True)


def test_constrained_json_final_is_ok(encoding: HarmonyEncoding) -> None:
    tokens = build(encoding, CHANNEL, "analysis", MESSAGE, "a", END, START, "assistant", CHANNEL, "final ",
                   CONSTRAIN, "json", MESSAGE, '{"violation": 0}', RETURN)
    assert verdict_of(encoding, tokens, PLAIN_JSON).status == OK


def test_malformed_final_wins_over_extra_messages(encoding: HarmonyEncoding) -> None:
    tokens = build(encoding, CHANNEL, "commentary", MESSAGE, "x", END, *_final("maybe"), RETURN)
    assert verdict_of(encoding, tokens).status == MALFORMED


def test_unknown_output_format_is_malformed(encoding: HarmonyEncoding) -> None:
    verdict = verdict_of(encoding, completion(encoding, "1"), OutputSpec("xml"))
    assert verdict.status == MALFORMED and "unknown output format" in verdict.detail


# Property tests: any stream of ints gives a verdict, for both formats and every finish reason.

OUTPUTS = (BINARY, PLAIN_JSON, CATEGORIZED, FULL)
SPECIALS = [START_OF_TEXT, END_OF_TEXT, 200000, RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL, 200013,
            VOCAB_SIZE - 1]
ANY_ID = st.one_of(st.integers(), st.integers(-5, VOCAB_SIZE + 5), st.sampled_from(SPECIALS),
                   st.integers(0, FIRST_SPECIAL - 1))
# Fragments the parser and the JSON reader care about, so random streams often come close to a real answer.
PIECES = st.sampled_from(["analysis", "final", "commentary", "assistant", "user", " to=functions.x", "json", "0",
                          "1", "1.", '{"violation": 1}', '{"violation": 0, "policy_category": null}', "```json\n",
                          "\n```", '"policy_category": "VE1"', "{", "}", " ", "\n"])
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


def all_verdicts(parsed: ParsedCompletion) -> list[Verdict]:
    return [parse_verdict(parsed, output, finish) for output in OUTPUTS for finish in FINISH_REASONS]


@PROPERTY
@given(tokens=st.lists(ANY_ID, max_size=150))
def test_property_random_ids_always_give_a_status(encoding: HarmonyEncoding, tokens: list[int]) -> None:
    for verdict in all_verdicts(parse_completion(tokens, encoding.decode)):
        check_contract(verdict)


@PROPERTY
@given(parts=st.lists(st.one_of(st.sampled_from(SPECIALS), PIECES, TEXT), max_size=40))
def test_property_special_heavy_streams_always_give_a_status(encoding: HarmonyEncoding, parts: list) -> None:
    for verdict in all_verdicts(parse_completion(build(encoding, *parts), encoding.decode)):
        check_contract(verdict)


@st.composite
def answers(draw: st.DrawFn) -> tuple[OutputSpec, str, dict[str, Any]]:
    """A policy's output spec, a final text that follows it exactly, and the verdict fields it must give."""
    output = draw(st.sampled_from(OUTPUTS))
    violation = draw(st.booleans())
    if output.format == "binary":
        pad = draw(st.sampled_from(["", " ", "\n", "\n\n"]))
        return output, f"{pad}{int(violation)}{draw(st.sampled_from(['', '.']))}{pad}", {"violation": violation}
    category = rule_ids = confidence = rationale = None
    obj: dict[str, Any] = {"violation": draw(st.sampled_from([int(violation), violation]))}
    if violation:
        category = draw(st.sampled_from(output.categories or ("H2.f", None)))
        obj["policy_category"] = category
        rule_ids = draw(st.lists(st.sampled_from(output.rule_ids or ("H2.d", "H2.f")), unique=True, max_size=3))
        obj["rule_ids"] = rule_ids
    elif draw(st.booleans()):
        obj["policy_category"] = None
    if output.confidence:
        confidence = draw(st.sampled_from(["low", "medium", "high"]))
        obj["confidence"] = confidence
    if output.rationale or draw(st.booleans()):
        rationale = draw(TEXT)
        obj["rationale"] = rationale
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    if draw(st.booleans()):
        text = f"```json\n{text}\n```"
    expected = {"violation": violation, "category": category, "rule_ids": tuple(rule_ids or ()),
                "confidence": confidence, "rationale": rationale}
    return output, text, expected


@PROPERTY
@given(answer=answers(), analysis=st.none() | TEXT, drop_stop=st.booleans(),
       finish_reason=st.sampled_from(FINISH_REASONS))
def test_property_well_formed_completions_are_ok(encoding: HarmonyEncoding, answer: tuple, analysis: str | None,
                                                 drop_stop: bool, finish_reason: str) -> None:
    output, text, expected = answer
    tokens = completion(encoding, text, analysis)
    if drop_stop:
        tokens = tokens[:-1]
    verdict = verdict_of(encoding, tokens, output, finish_reason)
    if drop_stop and finish_reason != "stop":
        assert verdict.status == TRUNCATED and verdict.final_text == text
        return
    assert verdict.status == OK, verdict.detail
    assert {key: getattr(verdict, key) for key in expected} == expected
    assert (verdict.final_text, verdict.analysis) == (text, analysis or "")


MUTATION = st.tuples(st.sampled_from(["delete", "insert", "duplicate", "truncate"]), st.integers(0, 10**6), ANY_ID)


@PROPERTY
@given(answer=answers(), analysis=TEXT, mutations=st.lists(MUTATION, min_size=1, max_size=6))
def test_property_mutated_completions_always_give_a_status(encoding: HarmonyEncoding, answer: tuple, analysis: str,
                                                           mutations: list) -> None:
    tokens = completion(encoding, answer[1], analysis)
    for kind, where, token in mutations:
        at = where % (len(tokens) + 1)
        if kind == "delete":
            del tokens[at:at + 1]
        elif kind == "insert":
            tokens.insert(at, token)
        elif kind == "duplicate":
            specials = [i for i, t in enumerate(tokens) if t >= FIRST_SPECIAL]
            if specials:
                tokens.insert(specials[where % len(specials)], tokens[specials[where % len(specials)]])
        else:
            tokens = tokens[:at]
    for verdict in all_verdicts(parse_completion(tokens, encoding.decode)):
        check_contract(verdict)


@PROPERTY
@given(answer=answers(), analysis=TEXT, data=st.data())
def test_property_truncation_by_length(encoding: HarmonyEncoding, answer: tuple, analysis: str,
                                       data: st.DataObject) -> None:
    output, text, _ = answer
    tokens = completion(encoding, text, analysis)
    cut = data.draw(st.integers(0, len(tokens)))
    verdict = verdict_of(encoding, tokens[:cut], output, "length")
    assert verdict.status == (OK if cut == len(tokens) else TRUNCATED)
    assert text.startswith(verdict.final_text.rstrip("\ufffd"))  # a cut may split a character
