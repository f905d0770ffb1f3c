"""Token-building helpers shared by the completion-parser and verdict tests."""

from __future__ import annotations

from openai_harmony import HarmonyEncoding, Role
from openai_harmony import Message as HarmonyMessage

from classification.tokens import END, RETURN, START


def build(encoding: HarmonyEncoding, *parts: int | str) -> list[int]:
    """A token list from special ids and ordinary text (encoded piecewise, as harmony renders headers)."""
    tokens: list[int] = []
    for part in parts:
        tokens.extend([part] if isinstance(part, int) else encoding.encode(part, disallowed_special=()))
    return tokens


def rendered(encoding: HarmonyEncoding, analysis: str | None, final: str) -> list[int]:
    """A completion as harmony's own renderer writes it: the prompt's `<|start|>assistant` cut, `<|return|>` last."""
    messages = [] if analysis is None else [("analysis", analysis)]
    tokens: list[int] = []
    for channel, text in [*messages, ("final", final)]:
        tokens.extend(encoding.render(HarmonyMessage.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)))
    assert tokens[:2] == [START, 173781] and tokens[-1] == END
    return [*tokens[2:-1], RETURN]
