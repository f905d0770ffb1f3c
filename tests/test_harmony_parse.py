"""Harmony completion parsing: unit tests per anomaly, streaming, and property tests against openai-harmony itself."""

from __future__ import annotations

import itertools

import pytest
from harmony_tokens import build, rendered
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_harmony import HarmonyEncoding, Role

from classification.completion import (
    BAD_HEADER,
    DECODE_ERROR,
    INVALID_TOKEN,
    INVALID_UTF8,
    STRAY_TOKEN,
    UNCLOSED_HEADER,
    UNEXPECTED_SPECIAL,
    UNTERMINATED_MESSAGE,
    ParsedCompletion,
    StreamParser,
    parse_completion,
)
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
from classification.vocab import load_harmony_encoding, load_mergeable_ranks

ANOMALY_KINDS = {INVALID_TOKEN, UNEXPECTED_SPECIAL, STRAY_TOKEN, UNCLOSED_HEADER, UNTERMINATED_MESSAGE, BAD_HEADER,
                 DECODE_ERROR, INVALID_UTF8}
SPECIALS = [START_OF_TEXT, END_OF_TEXT, 200000, RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL, 200013,
            VOCAB_SIZE - 1]
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="session")
def encoding() -> HarmonyEncoding:
    return load_harmony_encoding()


def kinds(parsed: ParsedCompletion) -> list[str]:
    return [anomaly.kind for anomaly in parsed.anomalies]


def byte_tokens(*chunks: bytes) -> list[int]:
    ranks = load_mergeable_ranks()
    return [ranks[chunk] for chunk in chunks]


def test_well_formed_analysis_then_final(encoding: HarmonyEncoding) -> None:
    tokens = build(encoding, CHANNEL, "analysis", MESSAGE, "The text is benign.", END,
                   START, "assistant", CHANNEL, "final", MESSAGE, "0", RETURN)
    parsed = parse_completion(tokens, encoding.decode)
    analysis, final = parsed.messages
    assert (analysis.role, analysis.channel, analysis.content, analysis.terminator) == (
        "assistant", "analysis", "The text is benign.", "<|end|>")
    assert (final.role, final.channel, final.content, final.terminator) == ("assistant", "final", "0", "<|return|>")
    assert (analysis.start, analysis.end, final.start, final.end) == (0, tokens.index(END) + 1, tokens.index(START),
                                                                      len(tokens))
    assert parsed.anomalies == () and parsed.trailing == ()
    assert parsed.stop_token == RETURN and parsed.token_count == len(tokens)


def test_matches_harmony_renderer(encoding: HarmonyEncoding) -> None:
    parsed = parse_completion(rendered(encoding, "thinking…", '{"violation": 1}'), encoding.decode)
    assert [(m.channel, m.content) for m in parsed.messages] == [("analysis", "thinking…"),
                                                                 ("final", '{"violation": 1}')]


def test_stop_token_dropped_by_the_engine(encoding: HarmonyEncoding) -> None:
    parsed = parse_completion(rendered(encoding, "a", "1")[:-1], encoding.decode)
    assert parsed.messages[-1].terminator is None and parsed.messages[-1].content == "1"
    assert parsed.stop_token is None and parsed.anomalies == ()


def test_constrained_final_and_tool_call_headers(encoding: HarmonyEncoding) -> None:
    tokens = build(encoding, CHANNEL, "commentary to=functions.lookup ", CONSTRAIN, "json", MESSAGE, "{}", CALL)
    (call,) = parse_completion(tokens, encoding.decode).messages
    assert (call.channel, call.recipient, call.content_type, call.terminator) == (
        "commentary", "functions.lookup", "json", "<|call|>")
    tokens = build(encoding, CHANNEL, "final ", CONSTRAIN, "json", MESSAGE, "{}", RETURN)
    (final,) = parse_completion(tokens, encoding.decode).messages
    assert (final.channel, final.recipient, final.content_type) == ("final", None, "json")


def test_first_header_may_repeat_the_role(encoding: HarmonyEncoding) -> None:
    tokens = build(encoding, "assistant", CHANNEL, "final", MESSAGE, "1", RETURN)
    parsed = parse_completion(tokens, encoding.decode)
    assert [(m.role, m.channel, m.recipient) for m in parsed.messages] == [("assistant", "final", None)]
    assert parsed.anomalies == ()


def test_later_headers_carry_their_role(encoding: HarmonyEncoding) -> None:
    tokens = build(encoding, CHANNEL, "analysis", MESSAGE, "a", END, START, "user", MESSAGE, "hi", END)
    assert [(m.role, m.channel) for m in parse_completion(tokens, encoding.decode).messages] == [
        ("assistant", "analysis"), ("user", None)]


def test_tokens_after_the_stop_token_are_trailing(encoding: HarmonyEncoding) -> None:
    tokens = [*rendered(encoding, "a", "1"), END_OF_TEXT, *build(encoding, "more")]
    parsed = parse_completion(tokens, encoding.decode)
    assert parsed.trailing == (END_OF_TEXT, *build(encoding, "more")) and parsed.anomalies == ()
    assert parsed.messages[-1].content == "1"


@pytest.mark.parametrize("special", [END_OF_TEXT, START_OF_TEXT, MESSAGE, CHANNEL, CONSTRAIN, 200013, VOCAB_SIZE - 1])
def test_special_inside_content_is_dropped_and_reported(encoding: HarmonyEncoding, special: int) -> None:
    tokens = build(encoding, CHANNEL, "final", MESSAGE, "1", special, " ok", RETURN)
    parsed = parse_completion(tokens, encoding.decode)
    assert parsed.messages[0].content == "1 ok"
    assert kinds(parsed) == [UNEXPECTED_SPECIAL] and parsed.anomalies[0].index == 4


def test_start_inside_content_cuts_the_message(encoding: HarmonyEncoding) -> None:
    tokens = build(encoding, CHANNEL, "analysis", MESSAGE, "a", START, "assistant", CHANNEL, "final", MESSAGE, "1",
                   RETURN)
    parsed = parse_completion(tokens, encoding.decode)
    assert [(m.channel, m.content, m.terminator) for m in parsed.messages] == [
        ("analysis", "a", "<|start|>"), ("final", "1", "<|return|>")]
    assert kinds(parsed) == [UNTERMINATED_MESSAGE]
    assert parsed.messages[0].end == parsed.messages[1].start == tokens.index(START)


@pytest.mark.parametrize(("ender", "stop"), [(END, None), (RETURN, RETURN), (CALL, CALL), (START, None)])
def test_header_ended_before_message(encoding: HarmonyEncoding, ender: int, stop: int | None) -> None:
    parsed = parse_completion(build(encoding, CHANNEL, "final", ender), encoding.decode)
    assert parsed.messages == () and parsed.stop_token == stop
    assert kinds(parsed)[0] == UNCLOSED_HEADER and "<|channel|>final" in parsed.anomalies[0].detail


def test_header_still_open_at_the_end(encoding: HarmonyEncoding) -> None:
    parsed = parse_completion(build(encoding, CHANNEL, "analysis", MESSAGE, "a", END, START), encoding.decode)
    assert kinds(parsed) == [UNCLOSED_HEADER] and len(parsed.messages) == 1
    assert parse_completion([], encoding.decode) == ParsedCompletion((), (), None, (), 0)
    runaway = parse_completion(build(encoding, CHANNEL, "analysis " + "word " * 2000), encoding.decode)
    assert kinds(runaway) == [UNCLOSED_HEADER] and len(runaway.anomalies[0].detail) < 150


def test_stray_tokens_between_messages(encoding: HarmonyEncoding) -> None:
    tokens = build(encoding, CHANNEL, "analysis", MESSAGE, "a", END, "oops", END_OF_TEXT, START, "assistant",
                   CHANNEL, "final", MESSAGE, "1", RETURN)
    parsed = parse_completion(tokens, encoding.decode)
    assert set(kinds(parsed)) == {STRAY_TOKEN} and [m.content for m in parsed.messages] == ["a", "1"]
    stopped = parse_completion(build(encoding, CHANNEL, "final", MESSAGE, "1", END, RETURN), encoding.decode)
    assert kinds(stopped) == [STRAY_TOKEN] and stopped.stop_token == RETURN


@pytest.mark.parametrize(("header", "problem"), [
    ((CHANNEL, MESSAGE), "without a channel name"),
    ((CHANNEL, "final one two three", MESSAGE), "unexpected header text"),
    ((CHANNEL, "final", CHANNEL, "analysis", MESSAGE), "two channels"),
])
def test_bad_headers_still_open_a_message(encoding: HarmonyEncoding, header: tuple, problem: str) -> None:
    parsed = parse_completion(build(encoding, *header, "1", RETURN), encoding.decode)
    assert kinds(parsed) == [BAD_HEADER] and problem in parsed.anomalies[0].detail
    assert parsed.messages[0].content == "1"


def test_later_header_without_role(encoding: HarmonyEncoding) -> None:
    parsed = parse_completion(build(encoding, CHANNEL, "analysis", MESSAGE, "a", END, START, MESSAGE, "x"),
                              encoding.decode)
    assert kinds(parsed) == [BAD_HEADER] and parsed.messages[1].role == ""


@pytest.mark.parametrize("bad", [-1, -(2**80), VOCAB_SIZE, 2**31, 10**5000],
                         ids=["minus-one", "minus-2^80", "vocab-size", "2^31", "5000-digits"])
def test_invalid_ids_never_reach_the_decoder(encoding: HarmonyEncoding, bad: int) -> None:
    def strict_decode(ids: list[int]) -> str:
        assert all(0 <= t < FIRST_SPECIAL for t in ids)
        return encoding.decode(ids)

    for tokens in (build(encoding, bad, CHANNEL, "final", MESSAGE, "1", bad, RETURN),
                   build(encoding, CHANNEL, "analysis", MESSAGE, "a", END, bad, START, bad)):
        parsed = parse_completion(tokens, strict_decode)
        assert INVALID_TOKEN in kinds(parsed) or STRAY_TOKEN in kinds(parsed)
        assert DECODE_ERROR not in kinds(parsed)


def test_decoder_failure_is_an_anomaly(encoding: HarmonyEncoding) -> None:
    def broken(ids: list[int]) -> str:
        raise RuntimeError("no vocabulary")

    parsed = parse_completion(build(encoding, CHANNEL, "final", MESSAGE, "1", RETURN), broken)
    assert DECODE_ERROR in kinds(parsed) and parsed.messages[0].content == "\ufffd"


def test_invalid_utf8_is_flagged(encoding: HarmonyEncoding) -> None:
    euro = byte_tokens(b"\xe2", b"\x82", b"\xac")
    whole = parse_completion(build(encoding, CHANNEL, "final", MESSAGE, *euro, RETURN), encoding.decode)
    assert whole.messages[0].content == "€" and whole.anomalies == ()
    broken = parse_completion(build(encoding, CHANNEL, "final", MESSAGE, *euro[1:], RETURN), encoding.decode)
    assert broken.messages[0].content == "\ufffd\ufffd" and kinds(broken) == [INVALID_UTF8]


def test_streaming_token_by_token(encoding: HarmonyEncoding) -> None:
    tokens = rendered(encoding, "Reasoning about €5 and 🙂.", '{"violation": 0}')
    parser = StreamParser(encoding.decode)
    channels, texts = [], {0: "", 1: ""}
    for token in tokens:
        for delta in parser.feed([token]):
            texts[delta.message_index] += delta.text
            assert "\ufffd" not in delta.text
        channels.append(parser.current_channel)
    assert texts == {0: "Reasoning about €5 and 🙂.", 1: '{"violation": 0}'}
    assert "analysis" in channels and "final" in channels and channels[-1] is None
    assert parser.state == "done" and parser.finish() == parse_completion(tokens, encoding.decode)


def test_streaming_holds_back_split_characters(encoding: HarmonyEncoding) -> None:
    parser = StreamParser(encoding.decode)
    parser.feed(build(encoding, CHANNEL, "final", MESSAGE, "price "))
    assert [d.text for d in parser.feed(byte_tokens(b"\xe2", b"\x82"))] == []
    assert [d.text for d in parser.feed(byte_tokens(b"\xac"))] == ["€"]
    assert parser.finish().messages[0].content == "price €"


def test_finish_leaves_the_parser_usable(encoding: HarmonyEncoding) -> None:
    tokens = rendered(encoding, "a", "1")
    parser = StreamParser(encoding.decode)
    parser.feed(tokens[:4])
    first = parser.finish()
    assert first == parser.finish() and first.messages[-1].terminator is None
    parser.feed(tokens[4:])
    assert parser.finish() == parse_completion(tokens, encoding.decode)
    assert [m.channel for m in parser.messages] == ["analysis", "final"]


# Property tests. Texts avoid surrogates (not encodable) but include any other code point, so multi-byte characters
# split across tokens are exercised.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
ORDINARY = st.integers(0, FIRST_SPECIAL - 1)
ANY_ID = st.one_of(st.integers(), st.integers(-5, VOCAB_SIZE + 5), st.sampled_from(SPECIALS), ORDINARY)


def check_invariants(parsed: ParsedCompletion, tokens: list[int]) -> None:
    assert parsed.token_count == len(tokens)
    assert set(kinds(parsed)) <= ANOMALY_KINDS
    assert all(0 <= a.index <= len(tokens) for a in parsed.anomalies)
    previous_end = 0
    for message in parsed.messages:
        assert previous_end <= message.start < message.end <= len(tokens)
        previous_end = message.end
    assert not parsed.trailing or parsed.stop_token is not None
    if parsed.trailing:
        assert list(parsed.trailing) == tokens[len(tokens) - len(parsed.trailing):]


def chunked(tokens: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = sorted({0, len(tokens), *(c % (len(tokens) + 1) for c in cuts)})
    return [tokens[a:b] for a, b in itertools.pairwise(bounds)]


@PROPERTY
@given(tokens=st.lists(ANY_ID, max_size=120), cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_property_any_ints_parse_and_stream_alike(encoding: HarmonyEncoding, tokens: list[int],
                                                  cuts: list[int]) -> None:
    parsed = parse_completion(tokens, encoding.decode)
    check_invariants(parsed, tokens)
    parser = StreamParser(encoding.decode)
    for chunk in chunked(tokens, cuts):
        parser.feed(chunk)
    assert parser.finish() == parsed


@PROPERTY
@given(analysis=st.none() | TEXT, final=TEXT, cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_property_well_formed_agrees_with_harmony(encoding: HarmonyEncoding, analysis: str | None, final: str,
                                                  cuts: list[int]) -> None:
    tokens = rendered(encoding, analysis, final)
    parsed = parse_completion(tokens, encoding.decode)
    ours = [(m.role, m.channel, m.recipient, m.content) for m in parsed.messages]
    theirs = [(m.author.role.value, m.channel, m.recipient, m.content[0].text)
              for m in encoding.parse_messages_from_completion_tokens(tokens[:-1], Role.ASSISTANT)]
    assert ours == theirs
    assert [m.content for m in parsed.messages] == ([] if analysis is None else [analysis]) + [final]
    # A literal U+FFFD in the text is indistinguishable from invalid UTF-8, and flagged as such.
    expected = [INVALID_UTF8] * sum("\ufffd" in m.content for m in parsed.messages)
    assert kinds(parsed) == expected and parsed.stop_token == RETURN and parsed.trailing == ()

    parser = StreamParser(encoding.decode)
    streamed = [""] * len(parsed.messages)
    for chunk in chunked(tokens, cuts):
        for delta in parser.feed(chunk):
            assert delta.channel == parsed.messages[delta.message_index].channel
            streamed[delta.message_index] += delta.text
    assert streamed == [m.content for m in parsed.messages]
    assert parser.finish() == parsed


MUTATION = st.tuples(st.sampled_from(["delete", "insert", "duplicate", "truncate"]), st.integers(0, 10**6), ANY_ID)


def mutate(tokens: list[int], mutations: list[tuple[str, int, int]]) -> list[int]:
    tokens = list(tokens)
    for kind, where, token in mutations:
        at = where % (len(tokens) + 1)
        if kind == "delete":
            del tokens[at:at + 1]
        elif kind == "insert":
            tokens.insert(at, token)
        elif kind == "duplicate":
            specials = [i for i, t in enumerate(tokens) if t >= FIRST_SPECIAL]
            if specials:
                i = specials[where % len(specials)]
                tokens.insert(i, tokens[i])
        else:
            tokens = tokens[:at]
    return tokens


@PROPERTY
@given(analysis=TEXT, final=TEXT, mutations=st.lists(MUTATION, min_size=1, max_size=6))
def test_property_mutated_completions_never_raise(encoding: HarmonyEncoding, analysis: str, final: str,
                                                  mutations: list[tuple[str, int, int]]) -> None:
    tokens = mutate(rendered(encoding, analysis, final), mutations)
    check_invariants(parse_completion(tokens, encoding.decode), tokens)
