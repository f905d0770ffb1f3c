"""Harmony completion parsing: the token ids of one generated assistant turn -> its messages.

The prompt ends with `<|start|>assistant`, so a completion opens inside the header of the first assistant message:

    <|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…<|return|>

A message is a header (role, `<|channel|>name`, optional ` to=recipient`, optional ` <|constrain|>type`), then
`<|message|>`, then content, then a terminator: `<|end|>` (more messages follow), or `<|return|>` / `<|call|>`, the
stop tokens that end the turn. Engines may drop the stop token from their output, so a completion can also just end.

This module knows the format only; what a final message means for a policy is `classification.verdict`'s business.
The parser
is a token-level state machine that never raises for any sequence of ints: anything that does not fit the format
(ids outside the vocabulary, special tokens where text belongs, headers that never reach `<|message|>`, tokens after
the stop token) is recorded as an `Anomaly` and parsing goes on. Ordinary tokens are decoded in runs by a caller-given
`decode` (in production `HarmonyEncoding.decode`, which replaces invalid UTF-8), so the tokenizer stays out of here.
Header semantics follow openai-harmony's `StreamableParser` so that both agree on well-formed completions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from classification.tokens import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    FIRST_SPECIAL,
    MESSAGE,
    RETURN,
    START,
    STOP_TOKENS,
    TOKEN_NAMES,
    VOCAB_SIZE,
    token_name,
)

Decode = Callable[[list[int]], str]


# Anomaly kinds. Everything but invalid_utf8 means tokens the format has no place for; invalid_utf8 only says that a
# message's text holds U+FFFD (invalid UTF-8 from the model, or, rarely, a literal replacement character).
INVALID_TOKEN = "invalid_token"  # not an id of the vocabulary (negative, >= 201088)
UNEXPECTED_SPECIAL = "unexpected_special"  # a special token where text was expected (dropped from the text)
STRAY_TOKEN = "stray_token"  # a token between a message's end and the next <|start|>
UNCLOSED_HEADER = "unclosed_header"  # a header ended by something other than <|message|>
UNTERMINATED_MESSAGE = "unterminated_message"  # content cut off by a new <|start|>
BAD_HEADER = "bad_header"  # a header harmony would reject (no channel value, no role, leftover words)
DECODE_ERROR = "decode_error"  # the decoder raised; U+FFFD stands in for the text
INVALID_UTF8 = "invalid_utf8"

_CHANNEL_MARK = "<|channel|>"
_CONSTRAIN_MARK = "<|constrain|>"
# harmony ends a channel name at whitespace or at the next special token's text.
_CHANNEL_VALUE = re.compile(r"[^\s<]*")
_REPLACEMENT = "\ufffd"
# An incomplete UTF-8 character has at most 3 bytes, so it spans at most the last 3 tokens of a stream.
_MAX_PARTIAL_TOKENS = 3
_CLIP = 80


def _clip(text: str) -> str:
    """Model text quoted in an anomaly, cut short: a runaway header can run to thousands of tokens."""
    return text if len(text) <= _CLIP else text[:_CLIP] + "…"




@dataclass(frozen=True)
class Message:
    """One harmony message. `start`/`end` index the completion: header start to past the terminator."""

    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None  # e.g. "json" from ` <|constrain|>json` (the marker is stripped)
    content: str
    # "<|end|>", "<|return|>", "<|call|>", "<|start|>" (cut off by the next message: also an anomaly), or None when
    # the completion ended inside the content (truncation, or an engine that drops the stop token).
    terminator: str | None
    start: int
    end: int


@dataclass(frozen=True)
class Anomaly:
    kind: str
    index: int  # position in the completion of the token concerned (or of the message start)
    detail: str


@dataclass(frozen=True)
class ParsedCompletion:
    messages: tuple[Message, ...]
    anomalies: tuple[Anomaly, ...]
    stop_token: int | None  # the <|return|> or <|call|> that ended the turn, if one was generated
    trailing: tuple[int, ...]  # tokens after that stop token, which an engine should never emit
    token_count: int


@dataclass(frozen=True)
class Delta:
    """New content text of message `message_index` (its position in the final `messages`)."""

    message_index: int
    channel: str | None
    text: str


@dataclass(frozen=True)
class Header:
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    problem: str | None  # why harmony would reject this header, if it would


def parse_header(text: str, role: str | None) -> Header:
    """Split a decoded header the way harmony does; `role` is given for the first message (the prompt wrote it)."""
    problems: list[str] = []
    channel = None
    at = text.find(_CHANNEL_MARK)
    if at >= 0:
        after = text[at + len(_CHANNEL_MARK):]
        value = _CHANNEL_VALUE.match(after).group(0)
        if value:
            channel = value
        else:
            problems.append("<|channel|> without a channel name")
        text = text[:at] + after[len(value):]
    if _CHANNEL_MARK in text:
        problems.append("two channels")
    parts = text.strip().replace(_CONSTRAIN_MARK, " " + _CONSTRAIN_MARK).split()
    if role is None:
        role = parts.pop(0) if parts else ""
        if not role:
            problems.append("no role")
    elif parts and parts[0] == role:
        parts.pop(0)
    recipient, content_type = _recipient_and_type(parts)
    if parts:
        problems.append(f"unexpected header text {_clip(' '.join(parts))!r}")
    return Header(role, channel, recipient, content_type, "; ".join(problems) or None)


def _recipient_and_type(parts: list[str]) -> tuple[str | None, str | None]:
    """harmony's rule for the words after role and channel (consumes them from `parts`)."""
    if not parts:
        return None, None
    last = parts.pop()
    if last.startswith("to="):
        return last[3:], None
    if not parts and not last.startswith(_CONSTRAIN_MARK):
        return last, None
    content_type = last.removeprefix(_CONSTRAIN_MARK) or None
    recipient = parts.pop().removeprefix("to=") if parts else None
    return recipient, content_type


@dataclass
class _OpenMessage:
    header: Header
    start: int
    tokens: list[int] = field(default_factory=list)
    emitted_chars: int = 0  # content text already handed out as deltas
    pending_from: int = 0  # tokens before this index are covered by those deltas


_HEADER, _CONTENT, _BETWEEN, _DONE = "header", "content", "between", "done"


class StreamParser:
    """Incremental parser: `feed` token ids as they arrive, read deltas and `current_channel`, then `finish`.

    Deltas hold back at most the last few tokens of a message while they end in an incomplete UTF-8 character, so
    concatenated deltas equal the message content (unless the model emits invalid UTF-8 across a feed boundary).
    """

    def __init__(self, decode: Decode) -> None:
        self._decode_fn = decode
        self._state = _HEADER
        self._header: list[int | str] = []  # ordinary ids and the text of <|channel|> / <|constrain|>
        self._header_start = 0
        self._first = True  # the first header's role comes from the prompt, and its start token too
        self._open: _OpenMessage | None = None
        self._messages: list[Message] = []
        self._anomalies: list[Anomaly] = []
        self._stop_token: int | None = None
        self._trailing: list[int] = []
        self._count = 0
        self._closed_since_feed: list[tuple[int, int]] = []  # (message index, chars already emitted)

    @property
    def state(self) -> str:
        """One of header, content, between (after <|end|>) and done (after a stop token)."""
        return self._state

    @property
    def current_channel(self) -> str | None:
        """The channel of the message whose content is streaming now; None outside content."""
        return self._open.header.channel if self._open is not None else None

    @property
    def messages(self) -> tuple[Message, ...]:
        """Messages completed so far."""
        return tuple(self._messages)

    def feed(self, token_ids: Sequence[int]) -> list[Delta]:
        """Consume more tokens; returns the content text they added, per message, in order."""
        self._consume(token_ids)
        deltas = [
            Delta(index, self._messages[index].channel, self._messages[index].content[emitted:])
            for index, emitted in self._closed_since_feed
        ]
        self._closed_since_feed.clear()
        if self._open is not None:
            deltas.append(Delta(len(self._messages), self._open.header.channel, self._stable_delta(self._open)))
        return [delta for delta in deltas if delta.text]

    def finish(self) -> ParsedCompletion:
        """The parse of everything fed so far, as if the completion ended here (the parser itself is unchanged)."""
        messages = list(self._messages)
        anomalies = list(self._anomalies)
        if self._open is not None:
            messages.append(self._message(self._open, None, self._count, anomalies))
        elif self._state == _HEADER and (self._header or not self._first):
            text = _clip(self._header_text(self._header, anomalies))
            anomalies.append(Anomaly(UNCLOSED_HEADER, self._header_start, f"header {text!r} never reached <|message|>"))
        return ParsedCompletion(tuple(messages), tuple(anomalies), self._stop_token, tuple(self._trailing),
                                self._count)

    def _consume(self, tokens: Sequence[int]) -> None:
        base = self._count
        self._count += len(tokens)
        i, n = 0, len(tokens)
        while i < n:
            state = self._state
            if state == _CONTENT:
                # The hot loop: content is long runs of ordinary tokens, gathered without per-token dispatch.
                j = i
                while j < n and 0 <= tokens[j] < FIRST_SPECIAL:
                    j += 1
                self._open.tokens.extend(tokens[i:j])
                if j == n:
                    return
                self._content_special(tokens[j], base + j)
                i = j + 1
            elif state == _HEADER:
                self._header_token(tokens[i], base + i)
                i += 1
            elif state == _BETWEEN:
                self._between_token(tokens[i], base + i)
                i += 1
            else:
                self._trailing.extend(tokens[i:])
                return

    def _content_special(self, token: int, index: int) -> None:
        if token == END or token in STOP_TOKENS:
            self._close(TOKEN_NAMES[token], index + 1)
            self._end_message(token)
        elif token == START:
            self._anomalies.append(Anomaly(UNTERMINATED_MESSAGE, index, "<|start|> before the message's <|end|>"))
            self._close(TOKEN_NAMES[START], index)
            self._begin_header(index)
        else:
            self._anomalies.append(self._misplaced(token, index, "in message content"))

    def _header_token(self, token: int, index: int) -> None:
        if 0 <= token < FIRST_SPECIAL:
            self._header.append(token)
        elif token == CHANNEL:
            self._header.append(_CHANNEL_MARK)
        elif token == CONSTRAIN:
            self._header.append(_CONSTRAIN_MARK)
        elif token == MESSAGE:
            self._open_message(index)
        elif token in (START, END, RETURN, CALL):
            text = _clip(self._header_text(self._header, self._anomalies))
            self._anomalies.append(Anomaly(UNCLOSED_HEADER, index,
                                           f"header {text!r} ended by {TOKEN_NAMES[token]} before <|message|>"))
            if token == START:
                self._begin_header(index)
            else:
                self._header = []
                self._end_message(token)
        else:
            self._anomalies.append(self._misplaced(token, index, "in a message header"))

    def _between_token(self, token: int, index: int) -> None:
        if token == START:
            self._begin_header(index)
            return
        self._anomalies.append(Anomaly(STRAY_TOKEN, index, f"{token_name(token)} between messages"))
        if token in STOP_TOKENS:
            self._end_message(token)

    def _end_message(self, token: int) -> None:
        if token in STOP_TOKENS:
            self._state = _DONE
            self._stop_token = token
        else:
            self._state = _BETWEEN

    def _begin_header(self, index: int) -> None:
        self._state = _HEADER
        self._header = []
        self._header_start = index
        self._first = False

    def _open_message(self, index: int) -> None:
        header = parse_header(self._header_text(self._header, self._anomalies), "assistant" if self._first else None)
        if header.problem:
            self._anomalies.append(Anomaly(BAD_HEADER, self._header_start, header.problem))
        self._open = _OpenMessage(header, self._header_start)
        self._header = []
        self._first = False
        self._state = _CONTENT

    def _close(self, terminator: str, end: int) -> None:
        self._messages.append(self._message(self._open, terminator, end, self._anomalies))
        self._closed_since_feed.append((len(self._messages) - 1, self._open.emitted_chars))
        self._open = None

    def _message(self, open_message: _OpenMessage, terminator: str | None, end: int,
                 anomalies: list[Anomaly]) -> Message:
        content = self._decode(open_message.tokens, open_message.start, anomalies)
        if _REPLACEMENT in content:
            anomalies.append(Anomaly(INVALID_UTF8, open_message.start, "message text holds U+FFFD"))
        header = open_message.header
        return Message(header.role, header.channel, header.recipient, header.content_type, content, terminator,
                       open_message.start, end)

    def _stable_delta(self, open_message: _OpenMessage) -> str:
        """Decode the not-yet-emitted tokens, holding back a trailing incomplete UTF-8 character."""
        pending = open_message.tokens[open_message.pending_from:]
        if not pending:
            return ""
        text = self._decode(pending, open_message.start, self._anomalies)
        keep = 0
        if text.endswith(_REPLACEMENT):
            # Emit the longest prefix that ends on a whole character; if none does, the bytes are simply invalid.
            for cut in range(1, min(_MAX_PARTIAL_TOKENS, len(pending)) + 1):
                prefix = self._decode(pending[:-cut], open_message.start, self._anomalies)
                if not prefix.endswith(_REPLACEMENT):
                    text, keep = prefix, cut
                    break
        open_message.pending_from = len(open_message.tokens) - keep
        open_message.emitted_chars += len(text)
        return text

    def _header_text(self, items: list[int | str], anomalies: list[Anomaly]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for item in items:
            if isinstance(item, str):
                if run:
                    parts.append(self._decode(run, self._header_start, anomalies))
                    run = []
                parts.append(item)
            else:
                run.append(item)
        if run:
            parts.append(self._decode(run, self._header_start, anomalies))
        return "".join(parts)

    def _decode(self, tokens: list[int], index: int, anomalies: list[Anomaly]) -> str:
        if not tokens:
            return ""
        try:
            return self._decode_fn(tokens)
        except Exception as exc:  # the decoder is the caller's; its failure must not fail the parse
            anomalies.append(Anomaly(DECODE_ERROR, index, f"decoder raised {type(exc).__name__}: {exc}"))
            return _REPLACEMENT

    @staticmethod
    def _misplaced(token: int, index: int, where: str) -> Anomaly:
        if FIRST_SPECIAL <= token < VOCAB_SIZE:
            return Anomaly(UNEXPECTED_SPECIAL, index, f"{token_name(token)} {where}")
        return Anomaly(INVALID_TOKEN, index, f"{token_name(token)} is outside the vocabulary ({where})")


def parse_completion(tokens: Sequence[int], decode: Decode) -> ParsedCompletion:
    """Parse a whole completion (stop token included or not). Never raises for a sequence of ints."""
    parser = StreamParser(decode)
    parser._consume(tokens)  # no deltas: the one-shot path decodes each message exactly once
    return parser.finish()
