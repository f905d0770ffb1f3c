"""Canonical harmony rendering of a classification prompt, split into a cacheable prefix and a per-request tail.

    <|start|>system<|message|>{identity, knowledge cutoff, Reasoning: <effort>, channels}<|end|>   } prefix: once per
    <|start|>developer<|message|># Instructions\\n\\n{policy}<|end|>                                  } policy version,
    <|start|>user<|message|>{content, serialised as labelled text}<|end|>                          effort and model
    <|start|>assistant

The system message carries no date, so the prefix (and the KV cache behind it) is the same every day. The prefix
is rendered by openai-harmony itself and its ids are reused byte for byte; per request only the content is
tokenized, always as ordinary text, so content can never produce special tokens (`<|start|>` typed by a user is
seven ordinary tokens). A prefix is named by `prefix_key` (model fingerprint and prefix ids), the one key the front
end routes by and an executor's prefix store files KV under.

Content is tokenized with quicktok's o200k encoder when it agrees with harmony's on a probe: it is exact BPE over
the same vocabulary (the one our offline vocabulary file is rebuilt from) and about ten times faster on this machine
(14 against 200 µs for 2,000 characters), which matters because tokenizing the content is the only per-request
rendering work.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from threading import Lock

from openai_harmony import (
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
)

from classification.content import Content, serialise

EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
# The classifier never calls tools, so `commentary` (the tool-call channel) is not offered.
CHANNELS = ("analysis", "final")


def prefix_key(model_fingerprint: str, ids: Sequence[int]) -> str:
    """Names a prompt prefix as computed by one model: sha256 hex over the fingerprint, a NUL, then the ids as
    little-endian int32. Equal keys mean the same KV cache, whoever computes them; the fingerprint keeps two models'
    caches of the same ids apart."""
    digest = hashlib.sha256(model_fingerprint.encode() + b"\x00")
    digest.update(struct.pack(f"<{len(ids)}i", *ids))
    return digest.hexdigest()


@dataclass(frozen=True)
class PromptPrefix:
    ids: tuple[int, ...]
    key: str  # prefix_key(model fingerprint, ids)
    effort: str


@dataclass(frozen=True)
class RenderedPrompt:
    ids: list[int]
    prefix_len: int
    prefix_key: str


def system_message(effort: str) -> Message:
    if effort not in EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(EFFORTS)}, got {effort!r}")
    content = SystemContent.new().with_reasoning_effort(EFFORTS[effort]).with_required_channels(list(CHANNELS))
    return Message.from_role_and_content(Role.SYSTEM, content)


def developer_message(instructions: str) -> Message:
    return Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(instructions))


def conversation(instructions: str, effort: str, content: Content) -> Conversation:
    """The whole prompt as harmony messages: what `PromptRenderer` must reproduce token for token."""
    user = Message.from_role_and_content(Role.USER, serialise(content))
    return Conversation.from_messages([system_message(effort), developer_message(instructions), user])


def prefix_ids(encoding: HarmonyEncoding, instructions: str, effort: str) -> tuple[int, ...]:
    """System and developer messages, rendered by harmony (the slow part, done once per policy version)."""
    messages = [system_message(effort), developer_message(instructions)]
    return tuple(encoding.render_conversation(Conversation.from_messages(messages)))


class PromptRenderer:
    """Renders prompts for one model; prefixes are computed once and kept (bounded, least recently used)."""

    def __init__(self, encoding: HarmonyEncoding, model_fingerprint: str, max_prefixes: int = 1024,
                 encode_ordinary: Callable[[str], list[int]] | None = None):
        self.encoding = encoding
        self._encode = encode_ordinary or content_encoder(encoding)
        self.model_fingerprint = model_fingerprint
        self._max = max_prefixes
        self._prefixes: OrderedDict[tuple[str, str], PromptPrefix] = OrderedDict()
        self._lock = Lock()
        # The user message frame around the content, taken from harmony so it cannot drift from the renderer.
        marker = "\x00"
        framed = encoding.render_conversation_for_completion(
            Conversation.from_messages([Message.from_role_and_content(Role.USER, marker)]), Role.ASSISTANT)
        marker_ids = encoding.encode(marker, disallowed_special=())
        at = _find(framed, marker_ids)
        self._user_head = tuple(framed[:at])
        self._user_tail = tuple(framed[at + len(marker_ids):])

    def prefix(self, instructions: str, effort: str) -> PromptPrefix:
        cache_key = (hashlib.sha256(instructions.encode()).hexdigest(), effort)
        with self._lock:
            found = self._prefixes.get(cache_key)
            if found is not None:
                self._prefixes.move_to_end(cache_key)
                return found
        ids = prefix_ids(self.encoding, instructions, effort)
        made = PromptPrefix(ids, prefix_key(self.model_fingerprint, ids), effort)
        with self._lock:
            self._prefixes[cache_key] = made
            while len(self._prefixes) > self._max:
                self._prefixes.popitem(last=False)
        return made

    def render(self, prefix: PromptPrefix, content: Content) -> RenderedPrompt:
        body = self._encode(serialise(content))
        ids = [*prefix.ids, *self._user_head, *body, *self._user_tail]
        return RenderedPrompt(ids, len(prefix.ids), prefix.key)


_PROBE = "Probe <|start|>user<|message|> 12345 héllo 😀 中文\n\n  \tend's"


def content_encoder(encoding: HarmonyEncoding) -> Callable[[str], list[int]]:
    """The fastest encoder that tokenizes exactly like harmony, treating special-token text as ordinary text."""

    def harmony_encode(text: str) -> list[int]:
        return encoding.encode(text, disallowed_special=())

    try:
        import quicktok

        fast = quicktok.get_encoding("o200k_harmony").encode_ordinary
    except (ImportError, ValueError, KeyError):
        return harmony_encode
    return fast if fast(_PROBE) == harmony_encode(_PROBE) else harmony_encode


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    raise ValueError("harmony did not render the content marker verbatim")
