"""What is classified: a text, a prompt and a model's response, or a conversation; and how each becomes the
user message of the prompt."""

from __future__ import annotations

from dataclasses import dataclass

CONVERSATION_ROLES = ("user", "assistant")


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
        return content.text
    if isinstance(content, PromptResponse):
        return f"## PROMPT\n{content.prompt}\n\n## RESPONSE\n{content.response}"
    return "\n\n".join(f"## TURN {i} ({t.role.upper()})\n{t.content}" for i, t in enumerate(content.turns, 1))
