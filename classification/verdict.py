"""The verdict: a parsed completion read against the policy's declared output format.

`parse_verdict` never raises. Its status says how far the completion can be trusted:

- ``ok``: one optional analysis message, then one final message that parses, and nothing else.
- ``truncated``: generation ended for a reason other than ``stop`` (``length``, ``cancelled``, ``error``) before the
  final message was complete. The partial analysis and final text are kept; no verdict.
- ``missing_final``: generation stopped but no assistant message on the ``final`` channel was produced.
- ``malformed``: the final message does not parse as the declared format; no verdict.
- ``extra_messages``: the final message parses, but the completion holds more than analysis + final: another
  message (commentary, a tool call, another role, a second analysis or final, anything after the final), special
  tokens where text belongs, stray tokens between messages, headers that never opened a message, or tokens after the
  stop token (``<|endoftext|>`` padding there excepted). The verdict is read from the *last* final message and is
  filled in, so a caller can decide whether to use it; ``detail`` says what was extra.

So ``violation`` is set exactly when status is ``ok`` or ``extra_messages``. The statuses are checked in the order
truncated, missing_final, malformed, extra_messages. A final message counts as complete when a terminator
(``<|return|>``, ``<|end|>``, ``<|call|>``, or the next ``<|start|>``) follows it, or when the finish reason is ``stop``
(engines may drop the stop token from their output).

Binary format: the final text, stripped of surrounding whitespace, is ``0`` or ``1``, optionally followed by one
``.``. Anything else (words, quotes, JSON, ``**1**``) is malformed.

JSON format: the final text, stripped, is one JSON object, optionally inside a single ```` ```json ```` (or bare
```` ``` ````) fence; nothing may precede or follow it. Keys may not repeat; unknown keys are ignored. Fields:

- ``violation`` (required): 0, 1, false or true. Strings, 0.0/1.0, other numbers: malformed.
- ``policy_category``: with violation 1 and declared categories, required and one of them (exact spelling);
  with violation 1 and no declared categories, any string or null; with violation 0, absent or null (a category
  contradicts "no violation": malformed).
- ``rule_ids``: optional list of strings (absent means none); with declared rule ids each must be declared; with
  violation 0 it must be empty; duplicates are dropped.
- ``confidence``: ignored unless the policy asks for it; then required, one of low, medium, high (case-insensitive,
  reported lowercase), because callers route low-confidence verdicts to review.
- ``rationale``: a string or a list of strings (joined by newlines, as the guide allows 2–4 bullets); absent is
  tolerated (it explains, it does not decide). A wrong type is malformed only when the policy asks for a rationale;
  otherwise the field is ignored.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from classification.completion import INVALID_UTF8, Message, ParsedCompletion
from classification.policy import OutputSpec
from classification.tokens import END_OF_TEXT, token_name

OK = "ok"
MALFORMED = "malformed"
MISSING_FINAL = "missing_final"
TRUNCATED = "truncated"
EXTRA_MESSAGES = "extra_messages"
STATUSES = (OK, MALFORMED, MISSING_FINAL, TRUNCATED, EXTRA_MESSAGES)
CONFIDENCES = ("low", "medium", "high")

_BINARY = re.compile(r"\s*([01])\.?\s*")
_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)
# Details quote model text; keep them short enough for a log line or an API field.
_QUOTE_LIMIT = 80
_FEW = 4
_MISSING = object()


@dataclass(frozen=True)
class Verdict:
    status: str
    violation: bool | None = None
    category: str | None = None
    rule_ids: tuple[str, ...] = ()
    confidence: str | None = None
    rationale: str | None = None
    analysis: str = ""  # the analysis channel: the model's reasoning
    final_text: str = ""  # the raw final message content
    detail: str = ""  # why status is not ok


@dataclass(frozen=True)
class _Answer:
    violation: bool
    category: str | None = None
    rule_ids: tuple[str, ...] = ()
    confidence: str | None = None
    rationale: str | None = None


class _Malformed(Exception):
    """Raised inside this module only: why a final text does not fit the declared format."""


def parse_verdict(parsed: ParsedCompletion, output: OutputSpec, finish_reason: str) -> Verdict:
    """The verdict for one completion; never raises (see the module docstring for the rules)."""
    try:
        return _verdict(parsed, output, finish_reason)
    except Exception as exc:  # a bug here must cost one verdict, not the request; tests assert this never fires
        return Verdict(MALFORMED, detail=f"internal error while reading the verdict: {type(exc).__name__}: {exc}")


def _verdict(parsed: ParsedCompletion, output: OutputSpec, finish_reason: str) -> Verdict:
    analysis = "\n".join(m.content for m in parsed.messages if _is_assistant(m, "analysis"))
    finals = [m for m in parsed.messages if _is_assistant(m, "final")]
    final = finals[-1] if finals else None
    if final is None:
        if finish_reason != "stop":
            return Verdict(TRUNCATED, analysis=analysis,
                           detail=f"generation ended ({finish_reason}) before a final message")
        return Verdict(MISSING_FINAL, analysis=analysis, detail=_missing_final_detail(parsed))
    text = final.content
    if final.terminator is None and finish_reason != "stop":
        return Verdict(TRUNCATED, analysis=analysis, final_text=text,
                       detail=f"generation ended ({finish_reason}) inside the final message")
    try:
        answer = _read_answer(text, output)
    except _Malformed as exc:
        return Verdict(MALFORMED, analysis=analysis, final_text=text, detail=str(exc))
    extras = _extras(parsed, final)
    status = EXTRA_MESSAGES if extras else OK
    return Verdict(status, answer.violation, answer.category, answer.rule_ids, answer.confidence, answer.rationale,
                   analysis, text, _first_few(extras, "; "))


def _is_assistant(message: Message, channel: str) -> bool:
    return message.role == "assistant" and message.channel == channel


def _missing_final_detail(parsed: ParsedCompletion) -> str:
    if not parsed.messages:
        return "the completion holds no message"
    return f"no final message; got {_first_few([_describe(m) for m in parsed.messages], ', ')}"


def _describe(message: Message) -> str:
    name = f"{message.role}/{message.channel or 'no channel'}"
    return f"{name} to={message.recipient}" if message.recipient else name


def _extras(parsed: ParsedCompletion, final: Message) -> list[str]:
    """What the completion holds beyond [analysis] + final, as short phrases (empty when nothing)."""
    extras: list[str] = []
    analyses = 0
    for message in parsed.messages:
        if message is final:
            continue
        if _is_assistant(message, "analysis") and not message.recipient and message.start < final.start:
            analyses += 1
            continue
        where = "after" if message.start > final.start else "before"
        extras.append(f"{_describe(message)} message {where} the final one")
    if analyses > 1:
        extras.append(f"{analyses} analysis messages")
    if final.recipient:
        extras.append(f"the final message is addressed to {final.recipient}")
    if final.terminator == "<|call|>":
        extras.append("the final message ends with <|call|>")
    anomalies = [a for a in parsed.anomalies if a.kind != INVALID_UTF8]
    if anomalies:
        more = f" (and {len(anomalies) - 1} more)" if len(anomalies) > 1 else ""
        extras.append(f"{anomalies[0].kind} at token {anomalies[0].index}: {anomalies[0].detail}{more}")
    trailing = [t for t in parsed.trailing if t != END_OF_TEXT]
    if trailing:
        stop = token_name(parsed.stop_token) if parsed.stop_token is not None else "the stop token"
        extras.append(f"{len(trailing)} tokens after {stop}")
    return extras


def _read_answer(text: str, output: OutputSpec) -> _Answer:
    """Parse a final message's text per the output format; raises _Malformed with the reason."""
    if output.format == "binary":
        return _read_binary(text)
    if output.format == "json":
        return _read_json(text, output)
    raise _Malformed(f"unknown output format {output.format!r}")


def _read_binary(text: str) -> _Answer:
    match = _BINARY.fullmatch(text)
    if match is None:
        raise _Malformed(f"expected 0 or 1, got {_quote(text)}")
    return _Answer(match.group(1) == "1")


def _read_json(text: str, output: OutputSpec) -> _Answer:
    obj = _load_object(text)
    violation = _violation(obj)
    confidence = _confidence(obj) if output.confidence else None
    return _Answer(violation, _category(obj, violation, output.categories), _rule_ids(obj, violation, output.rule_ids),
                   confidence, _rationale(obj, output.rationale))


def _load_object(text: str) -> dict[str, Any]:
    body = text.strip()
    fenced = _FENCED.fullmatch(body)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _Malformed("final text nests JSON too deeply") from None
    except ValueError as exc:  # JSONDecodeError, a repeated key, an integer too long to convert
        raise _Malformed(f"final text is not one JSON object ({exc}): {_quote(text)}") from None
    if not isinstance(value, dict):
        raise _Malformed(f"final text is JSON {type(value).__name__}, not an object: {_quote(text)}")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise ValueError(f"repeated key {_quote(', '.join(repeated))}")
    return obj


def _violation(obj: dict[str, Any]) -> bool:
    value = obj.get("violation", _MISSING)
    if value is _MISSING:
        raise _Malformed("JSON has no \"violation\"")
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return value == 1
    raise _Malformed(f"\"violation\" must be 0, 1, false or true, got {_show(value)}")


def _category(obj: dict[str, Any], violation: bool, declared: tuple[str, ...]) -> str | None:
    value = obj.get("policy_category")
    if not violation:
        if value is not None:
            raise _Malformed(f"\"policy_category\" is {_show(value)} but \"violation\" is 0")
        return None
    if value is not None and not isinstance(value, str):
        raise _Malformed(f"\"policy_category\" must be a string, got {_show(value)}")
    if declared and value not in declared:
        got = "none" if value is None else _quote(value)
        raise _Malformed(f"\"policy_category\" must be one of {', '.join(declared)}; got {got}")
    return value


def _rule_ids(obj: dict[str, Any], violation: bool, declared: tuple[str, ...]) -> tuple[str, ...]:
    value = obj.get("rule_ids", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Malformed(f"\"rule_ids\" must be a list of strings, got {_show(value)}")
    ids = tuple(dict.fromkeys(value))
    if ids and not violation:
        raise _Malformed(f"\"rule_ids\" lists {', '.join(ids)} but \"violation\" is 0")
    unknown = [rule for rule in ids if rule not in declared] if declared else []
    if unknown:
        raise _Malformed(f"\"rule_ids\" has undeclared ids {_quote(', '.join(unknown))}")
    return ids


def _confidence(obj: dict[str, Any]) -> str:
    value = obj.get("confidence")
    if isinstance(value, str) and value.lower() in CONFIDENCES:
        return value.lower()
    got = "none" if value is None else _show(value)
    raise _Malformed(f"\"confidence\" must be one of {', '.join(CONFIDENCES)}; got {got}")


def _rationale(obj: dict[str, Any], asked: bool) -> str | None:
    value = obj.get("rationale")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if asked:
        raise _Malformed(f"\"rationale\" must be a string or a list of strings, got {_show(value)}")
    return None


def _first_few(phrases: list[str], separator: str) -> str:
    """Join phrases for a detail line, repeats counted and only the first few named: a runaway completion can
    produce thousands."""
    counted = [f"{phrase} (x{count})" if count > 1 else phrase for phrase, count in Counter(phrases).items()]
    shown = separator.join(counted[:_FEW])
    return f"{shown}{separator}and {len(counted) - _FEW} more" if len(counted) > _FEW else shown


def _show(value: Any) -> str:
    """A JSON value, quoted and shortened for a detail line."""
    try:
        return _quote(json.dumps(value))
    except (ValueError, RecursionError):  # nested deeper than the encoder allows
        return type(value).__name__


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "…")
