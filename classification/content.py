"""What is classified: a text, a prompt and a model's response, or a conversation; and how each becomes the
user message of the prompt.

Pairs and conversations are framed as labelled sections, each a header line then the section's text:

    ## PROMPT                 ## TURN 1 (USER)
    {prompt}                  {content}

    ## RESPONSE               ## TURN 2 (ASSISTANT)
    {response}                {content}

The framing cannot be forged by the content. A header is a line starting with "## "; any line of the content
whose first visible character is a "#" (or a fullwidth or small "#" that reads like one), possibly after a run of
backslashes, gets one more backslash in front of that run: the Markdown escape, which the model reads as a literal
"#". So "## RESPONSE" inside a prompt reaches the model as "\\## RESPONSE", no content line can look like a header
(whatever blanks or invisible characters precede it), and removing one backslash from every escaped line gives
the content back exactly. A line is what `str.splitlines` splits on (LF, CR, the Unicode line and paragraph
separators and the rest), so a CR or U+2028 cannot start an unescaped line either. A text is escaped by the same
rule, so a text can never pass for a framed pair. Content with no line starting with "#" is sent unchanged.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

CONVERSATION_ROLES = ("user", "assistant")
HASHES = "#\uff03\ufe5f"  # "#", fullwidth "＃", small "﹟": NFKC makes the last two a "#"
ESCAPE = "\\"


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class PromptResponse:
    """A prompt and a model's response to it; the policy says which one is judged (usually the response)."""

    prompt: str
    response: str


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Chat:
    turns: tuple[Turn, ...]


Content = Text | PromptResponse | Chat


def serialise(content: Content) -> str:
    """The user message text. Pairs and conversations become labelled text inside one user message: rendering
    them as real harmony turns would make the model answer the chat instead of judging it."""
    if isinstance(content, Text):
        return escape(content.text)
    if isinstance(content, PromptResponse):
        return f"## PROMPT\n{escape(content.prompt)}\n\n## RESPONSE\n{escape(content.response)}"
    return "\n\n".join(f"{turn_header(i, t.role)}\n{escape(t.content)}" for i, t in enumerate(content.turns, 1))


def turn_header(number: int, role: str) -> str:
    if role not in CONVERSATION_ROLES:  # the servicer refuses other roles first; this keeps the header fixed
        raise ValueError(f"a turn's role must be one of {', '.join(CONVERSATION_ROLES)}, got {role!r}")
    return f"## TURN {number} ({role.upper()})"


def escape(text: str) -> str:
    """`text` with an escaping backslash on every line whose first visible character is a "#" or a backslash run
    ending in one (see the module docstring); other lines are unchanged."""
    if not any(h in text for h in HASHES):
        return text  # the common case, one scan
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        at = _lead(line)
        rest = line[at:].lstrip(ESCAPE)
        if rest[:1] and rest[0] in HASHES:
            lines[i] = line[:at] + ESCAPE + line[at:]
    return "".join(lines)


def _lead(line: str) -> int:
    """Where the visible part of a line starts: past blanks and invisible (format) characters."""
    for i, char in enumerate(line):
        if not (char.isspace() or unicodedata.category(char) == "Cf"):
            return i
    return len(line)
