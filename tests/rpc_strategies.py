"""Hypothesis strategies for every request of safeguard.v1.Safeguard, valid and hostile alike, as `Case`s: the
method, what to send (a request message, or raw bytes that are not a valid one) and the statuses that method may
answer. Shared by tests/test_fuzz.py (a CI-sized run) and scripts/fuzz_rpcs.py (10,000 cases and more).

The canned model is steered by marker words at the start of the content (tests/test_triton_client.py). Content
never starts with its failure marker: that one makes the model fail on purpose, which is the one INTERNAL that is
the service's honest answer. The slow marker costs seconds per case, so it is left out too.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import text_format
from hypothesis import strategies as st

from classification.library import bundled_policies, bundled_policy
from server.generated.safeguard.v1 import safeguard_pb2 as pb

UNARY, STREAM = "unary", "stream"
METHODS: dict[str, str] = {"Classify": UNARY, "ClassifyStream": STREAM, "ClassifyBatch": STREAM,
                           "PutPolicy": UNARY, "GetPolicy": UNARY, "ListPolicies": UNARY,
                           "ActivatePolicy": UNARY, "RollbackPolicy": UNARY}
REQUEST_TYPES: dict[str, type] = {"Classify": pb.ClassifyRequest, "ClassifyStream": pb.ClassifyRequest,
                                  "ClassifyBatch": pb.ClassifyBatchRequest, "PutPolicy": pb.PutPolicyRequest,
                                  "GetPolicy": pb.GetPolicyRequest, "ListPolicies": pb.ListPoliciesRequest,
                                  "ActivatePolicy": pb.ActivatePolicyRequest,
                                  "RollbackPolicy": pb.RollbackPolicyRequest}

# What each method may answer. RESOURCE_EXHAUSTED: the in-flight limit, or a message over gRPC's 4 MiB;
# ALREADY_EXISTS: a request id already in flight (two batch items with one item_id). Never INTERNAL or UNKNOWN (a
# fault of ours), nor DEADLINE_EXCEEDED (a hang) nor UNAVAILABLE (Triton is up throughout).
_CLASSIFY = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
                       "ALREADY_EXISTS"})
_ADMIN = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS",
                    "RESOURCE_EXHAUSTED"})
EXPECTED: dict[str, frozenset[str]] = {"Classify": _CLASSIFY, "ClassifyStream": _CLASSIFY, "ClassifyBatch": _CLASSIFY,
                                       "PutPolicy": _ADMIN, "GetPolicy": _ADMIN,
                                       "ListPolicies": frozenset({"OK", "RESOURCE_EXHAUSTED"}),
                                       "ActivatePolicy": _ADMIN, "RollbackPolicy": _ADMIN}
# Bytes that do not parse as the method's request: the server cannot read them, which is the client's fault.
EXPECTED_RAW = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"})
# What one batch item's error may say (a batch answers OK with per-item errors).
EXPECTED_ITEM = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
                           "ALREADY_EXISTS"})

GRPC_MESSAGE_LIMIT = 4 << 20  # the server's default max_receive_message_length
SMOKE_TEXT = bundled_policy("smoke").read_text(encoding="utf-8")
SMOKE_SHA = hashlib.sha256(SMOKE_TEXT.encode()).hexdigest()
LIBRARY_TEXTS = tuple(p.read_text(encoding="utf-8") for p in bundled_policies())
MARKERS = ("BANANA", "GARBLE")
NESTING = 10_000  # deep enough to exhaust any recursive parser
FENCE = "+++"


@dataclass(frozen=True)
class Case:
    """One call: `request` is a message, or bytes sent as they are (`raw`)."""

    method: str
    request: Any
    label: str = ""  # what kind of hostile input this is, for the report

    @property
    def raw(self) -> bool:
        return isinstance(self.request, bytes)

    @property
    def expected(self) -> frozenset[str]:
        # Some byte strings happen to parse (b"" is an empty request): then the method's own answers apply.
        return EXPECTED_RAW | EXPECTED[self.method] if self.raw else EXPECTED[self.method]

    def payload(self) -> bytes:
        return self.request if self.raw else self.request.SerializeToString()

    def describe(self, limit: int = 600) -> str:
        """A repro a person can read: huge repeated strings are shown by their length."""
        shown = repr(self.request) if self.raw else (
            f"{type(self.request).__name__}({text_format.MessageToString(self.request, as_one_line=True)})")
        shown = _RUN.sub(lambda m: f"<{m[1]!r} x {len(m[0]) // len(m[1]):,}>", shown)
        shown = shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown):,} chars)"
        return f"{self.method}[{self.label or 'random'}] {shown}"


_RUN = re.compile(r"(.{1,12}?)\1{15,}", re.DOTALL)  # a unit repeated: shown as <unit x count>


# -- text ---------------------------------------------------------------------------------------------------------

CONTROL = "".join(map(chr, range(0x20))) + "\x7f\x85"
BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
ODD = "\u0301\u0336\u05d0\u0627\ufdfd\ufffd\uffff\U0001f600\U0001f3f3\ufe0f\u200d\U0001f308\U0010ffff\u3000"
HARMONY = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>",
           "\n\n## RESPONSE\n", "\n\n## PROMPT\n", "\n\n## TURN 1 (user)\n", "+++")

odd_chars = st.characters(codec="utf-8") | st.sampled_from(CONTROL + BIDI + INVISIBLE + ODD)
odd_text = st.text(odd_chars, max_size=40) | st.lists(st.sampled_from(HARMONY) | st.text(odd_chars, max_size=8),
                                                     max_size=6).map("".join)


@st.composite
def huge_text(draw: st.DrawFn) -> str:
    """A long string that still fits one gRPC message: a run of one character, or a repeated phrase."""
    unit = draw(st.sampled_from(["a", "\u202e", "\U0001f600", "banana ", "\x00", " ", "<|start|>"]))
    chars = draw(st.sampled_from([10_000, 200_000, 1_000_000]))
    return unit * max(1, chars // len(unit.encode()))


def texts(allow_huge: bool = True) -> st.SearchStrategy[str]:
    plain = st.sampled_from(["hello there", "", " ", "\n", "Two bananas, please."])
    marked = st.tuples(st.sampled_from(MARKERS), odd_text).map(" ".join)
    options = [plain, marked, odd_text, st.text(max_size=200)]
    return st.one_of(*options, huge_text()) if allow_huge else st.one_of(*options)


# -- policies -----------------------------------------------------------------------------------------------------

def nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "a = " + "[" * depth + "]" * depth
    if kind == "inline-table":
        return "a = " + "{b = " * depth + "1" + "}" * depth
    return "a = " + "[" * depth  # never closed


@st.composite
def mutated_policy(draw: st.DrawFn) -> str:
    """A library policy with its front matter or body broken in one way."""
    text = draw(st.sampled_from(LIBRARY_TEXTS))
    front, _, body = text.removeprefix(FENCE + "\n").partition("\n" + FENCE + "\n")
    how = draw(st.sampled_from(["nested", "no-body", "no-fence", "unclosed", "bad-toml", "odd-id", "odd-version",
                                "drop-line", "odd-body", "crlf-bom", "new-version", "duplicate-key"]))
    if how == "nested":
        kind = draw(st.sampled_from(["array", "inline-table", "unclosed"]))
        return f"{FENCE}\n{front}\n{nested(draw(st.sampled_from([50, 1000, NESTING])), kind)}\n{FENCE}\n{body}"
    if how == "no-body":
        return f"{FENCE}\n{front}\n{FENCE}\n" + draw(st.sampled_from(["", "\n\n", "   "]))
    if how == "no-fence":
        return front + "\n" + body
    if how == "unclosed":
        return f"{FENCE}\n{front}\n{body}"
    if how == "bad-toml":
        return f"{FENCE}\n{front}\n{draw(odd_text)} = = \n{FENCE}\n{body}"
    if how in ("odd-id", "odd-version"):
        key = how.removeprefix("odd-")
        lines = [line for line in front.split("\n") if not line.startswith(f"{key} =")]
        value = draw(odd_text | huge_text()).replace("\\", "\\\\").replace('"', '\\"')
        value = "".join(c if c >= " " or c == "\t" else f"\\u{ord(c):04x}" for c in value)
        return f"{FENCE}\n{key} = \"{value}\"\n" + "\n".join(lines) + f"\n{FENCE}\n{body}"
    if how == "drop-line":
        lines = front.split("\n")
        del lines[draw(st.integers(0, len(lines) - 1))]
        return f"{FENCE}\n" + "\n".join(lines) + f"\n{FENCE}\n{body}"
    if how == "odd-body":
        return f"{FENCE}\n{front}\n{FENCE}\n{draw(odd_text | huge_text())}\n"
    if how == "crlf-bom":
        return "\ufeff" + text.replace("\n", "\r\n")
    if how == "duplicate-key":
        return f"{FENCE}\n{front}\n{front.split(chr(10))[0]}\n{FENCE}\n{body}"
    label = draw(st.text("0123456789.abc-", min_size=1, max_size=8))
    lines = [line if not line.startswith("version =") else f'version = "{label}"' for line in front.split("\n")]
    return f"{FENCE}\n" + "\n".join(lines) + f"\n{FENCE}\n{body}"


policy_texts = st.one_of(st.sampled_from(LIBRARY_TEXTS), mutated_policy(), odd_text, st.just(""))

refs = st.one_of(
    st.sampled_from(["smoke", "smoke@1.0.0", f"smoke@{SMOKE_SHA[:12]}", f"smoke@{SMOKE_SHA}", "smoke@0", "ghost",
                     "", "@", "smoke@", "@1.0.0", "smoke@@1", " smoke ", "SMOKE", "smoke@1.0.0@x", "self-harm",
                     "smoke\x00", "smoke\u202e", "../smoke", "smoke@" + "f" * 64]),
    odd_text, st.tuples(st.just("smoke@"), odd_text | huge_text()).map("".join), huge_text())
selectors = st.one_of(
    refs.map(lambda r: pb.PolicySelector(ref=r)),
    policy_texts.map(lambda t: pb.PolicySelector(inline_text=t)),
    st.just(pb.PolicySelector()))  # an empty oneof


@st.composite
def contents(draw: st.DrawFn, allow_huge: bool = True) -> pb.Content:
    text = texts(allow_huge)
    kind = draw(st.sampled_from(["text", "prompt_response", "conversation", "empty"]))
    if kind == "text":
        return pb.Content(text=draw(text))
    if kind == "prompt_response":
        return pb.Content(prompt_response=pb.PromptResponse(prompt=draw(text), response=draw(text)))
    if kind == "conversation":
        roles = st.sampled_from(["user", "assistant"]) | odd_text
        turns = draw(st.lists(st.builds(pb.Turn, role=roles, content=texts(allow_huge=False)), max_size=6))
        return pb.Content(conversation=pb.Conversation(turns=turns))
    return pb.Content()


# Mostly known values; now and then any int32 (proto3 enums are open: an unknown number arrives as it is).
efforts = st.one_of(*[st.integers(0, 3)] * 3, st.integers(-(2 ** 31), 2 ** 31 - 1))
request_ids = st.one_of(st.just(""), st.just(""), st.text("abc-0123456789", max_size=36), odd_text, huge_text())

good_selectors = st.one_of(st.sampled_from(["smoke", "smoke@1.0.0", f"smoke@{SMOKE_SHA[:12]}"]).map(
    lambda r: pb.PolicySelector(ref=r)), st.just(pb.PolicySelector(inline_text=SMOKE_TEXT)))
good_texts = st.one_of(st.sampled_from(["hello there", "Two bananas, please."]),
                       st.tuples(st.sampled_from(MARKERS), st.text(max_size=30)).map(" ".join))
good_contents = st.one_of(
    good_texts.map(lambda t: pb.Content(text=t)),
    st.tuples(good_texts, good_texts).map(lambda pr: pb.Content(prompt_response=pb.PromptResponse(
        prompt=pr[0], response=pr[1]))),
    st.lists(st.builds(pb.Turn, role=st.sampled_from(["user", "assistant"]), content=good_texts),
             min_size=1, max_size=4).map(lambda turns: pb.Content(conversation=pb.Conversation(turns=turns))))


@st.composite
def classify_requests(draw: st.DrawFn) -> pb.ClassifyRequest:
    message = pb.ClassifyRequest(reasoning_effort=draw(efforts), include_reasoning=draw(st.booleans()),
                                 request_id=draw(request_ids))
    shape = draw(st.sampled_from(["good", "good", "hostile", "hostile", "hostile", "bare"]))
    if shape == "good":
        message.policy.CopyFrom(draw(good_selectors))
        message.content.CopyFrom(draw(good_contents))
    elif shape == "hostile":
        message.policy.CopyFrom(draw(selectors | good_selectors))
        message.content.CopyFrom(draw(contents() | good_contents))
    return message


@st.composite
def batch_requests(draw: st.DrawFn, max_items: int = 12) -> pb.ClassifyBatchRequest:
    items = draw(st.lists(st.builds(pb.BatchItem, item_id=st.just("") | odd_text,
                                    content=contents(allow_huge=False) | good_contents,
                                    policies=st.lists(selectors | good_selectors, max_size=2)), max_size=max_items))
    return pb.ClassifyBatchRequest(items=items, policies=draw(st.lists(selectors | good_selectors, max_size=3)),
                                   reasoning_effort=draw(efforts), include_reasoning=draw(st.booleans()),
                                   request_id=draw(request_ids))


@st.composite
def many_items(draw: st.DrawFn) -> pb.ClassifyBatchRequest:
    """A batch far past the item limit, or with many policies for one item (cheap, repeated content)."""
    count = draw(st.sampled_from([300, 5000]))
    item = pb.BatchItem(content=pb.Content(text="hello"))
    policies = [pb.PolicySelector(ref="smoke")] * draw(st.sampled_from([1, 50]))
    return pb.ClassifyBatchRequest(items=[item] * count, policies=policies)


LIBRARY_IDS = tuple(p.stem for p in bundled_policies())
ids = st.one_of(st.sampled_from(LIBRARY_IDS), st.sampled_from(["smoke", "ghost", "", "SMOKE", "smoke "]), odd_text,
                huge_text())
versions = st.one_of(st.sampled_from(["1.0.0", SMOKE_SHA[:8], SMOKE_SHA]),
                     st.sampled_from(["", "latest", "@", "0" * 65, "1.0.0 "]), odd_text, huge_text())


@st.composite
def raw_payloads(draw: st.DrawFn) -> bytes:
    """Bytes that are not a valid request: random, a truncated message, bad UTF-8 in a string, a wrong wire type."""
    how = draw(st.sampled_from(["random", "truncated", "bad-utf8", "wire-type", "huge-length", "empty"]))
    if how == "random":
        return draw(st.binary(min_size=1, max_size=64))
    if how == "truncated":
        whole = pb.ClassifyRequest(policy=pb.PolicySelector(ref="smoke"),
                                   content=pb.Content(text="hello there")).SerializeToString()
        return whole[:draw(st.integers(1, len(whole) - 1))]
    if how == "bad-utf8":  # field 1 of GetPolicyRequest / PutPolicyRequest ... is a string
        bad = draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"]))
        return bytes([0x0A, len(bad)]) + bad
    if how == "wire-type":
        return bytes([0x0D]) + b"\x00\x00\x00\x00"  # field 1 as fixed32
    if how == "huge-length":
        return b"\x0a\xff\xff\xff\xff\x0f"  # a length prefix far past the end
    return b""


def _case(method: str, requests: st.SearchStrategy[Any], label: str = "") -> st.SearchStrategy[Case]:
    return requests.map(lambda request: Case(method, request, label))


def cases() -> st.SearchStrategy[Case]:
    """Every method, valid and hostile requests, raw bytes now and then."""
    classify = classify_requests()
    return st.one_of(
        _case("Classify", classify), _case("ClassifyStream", classify),
        _case("ClassifyBatch", batch_requests()), _case("ClassifyBatch", many_items(), "many-items"),
        _case("PutPolicy", st.builds(pb.PutPolicyRequest, text=policy_texts, activate=st.booleans())),
        _case("GetPolicy", st.builds(pb.GetPolicyRequest, ref=refs)),
        _case("ListPolicies", st.just(pb.ListPoliciesRequest())),
        _case("ActivatePolicy", st.builds(pb.ActivatePolicyRequest, id=ids, ref=versions)),
        _case("RollbackPolicy", st.builds(pb.RollbackPolicyRequest, id=ids)),
        st.builds(Case, st.sampled_from(sorted(METHODS)), raw_payloads(), st.just("raw-bytes")),
        _case("Classify", st.sampled_from(["a", "\u202e"]).map(lambda unit: pb.ClassifyRequest(
            policy=pb.PolicySelector(ref="smoke"),
            content=pb.Content(text=unit * (GRPC_MESSAGE_LIMIT // len(unit.encode()) + 1)))), "over-message-limit"),
    )
