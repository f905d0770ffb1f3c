"""The optional clean-up of content before classification: no zero-width or bidi controls, then Unicode NFKC.

Off by default (a setting server-wide, `normalise_input` in a policy's front matter per policy). Look-alike and
invisible characters let a text read one way to a person and another to a tokenizer: fullwidth letters, ligatures
and compatibility forms tokenize unlike the plain letters they show (NFKC folds them), a zero-width space splits a
word the model would know, and bidi overrides reorder what a reviewer sees. The transform is applied to every
field the model reads (text, prompt, response, each turn); the audit record still hashes what was received.
"""

from __future__ import annotations

import re
import unicodedata

from classification.content import Chat, Content, PromptResponse, Text, Turn

# Bidi embeddings, overrides and isolates, the directional marks, and the Arabic letter mark.
BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
# Zero-width space, non-joiner, joiner, word joiner, invisible operators, and the BOM used as a zero-width
# no-break space. The joiner (U+200D) also glues emoji sequences: removed, a family emoji reads as its members.
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff"
_INVISIBLE = re.compile(f"[{BIDI_CONTROLS}{ZERO_WIDTH}]")


def normalise_text(text: str) -> str:
    """Every bidi control and zero-width character removed (NFKC keeps them), then NFKC. Removing first lets NFKC
    compose what an invisible character kept apart, so the result is NFKC and the transform is idempotent."""
    return unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))


def normalise_content(content: Content) -> Content:
    """The same content with each text field normalised; roles are fixed words and are left as they are."""
    if isinstance(content, Text):
        return Text(normalise_text(content.text))
    if isinstance(content, PromptResponse):
        return PromptResponse(normalise_text(content.prompt), normalise_text(content.response))
    if isinstance(content, Chat):
        return Chat(tuple(Turn(t.role, normalise_text(t.content)) for t in content.turns))
    raise TypeError(f"not content: {type(content).__name__}")
