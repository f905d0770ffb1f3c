"""Content the serving core refuses before rendering it, and its size before tokenizing."""

from __future__ import annotations

from classification.content import CONVERSATION_ROLES, Chat, Content, PromptResponse, Text
from server.errors import InvalidArgument


def check_content(content: Content) -> None:
    """Refuse content with nothing to classify, or a conversation turn with a role the prompt cannot label."""
    if isinstance(content, Text):
        if not content.text.strip():
            raise InvalidArgument("content.text is empty: there is nothing to classify")
    elif isinstance(content, PromptResponse):
        if not content.prompt.strip() and not content.response.strip():
            raise InvalidArgument("content.prompt_response has an empty prompt and an empty response")
    elif isinstance(content, Chat):
        if not content.turns:
            raise InvalidArgument("content.conversation has no turns")
        for number, turn in enumerate(content.turns, 1):
            if turn.role not in CONVERSATION_ROLES:
                raise InvalidArgument(f"content.conversation turn {number} has role {turn.role!r}; a turn's role "
                                      f"must be one of {', '.join(CONVERSATION_ROLES)}")
        if not any(turn.content.strip() for turn in content.turns):
            raise InvalidArgument("content.conversation has only empty turns")
    else:
        raise InvalidArgument("no content given: set content.text, content.prompt_response or "
                              "content.conversation")


def content_chars(content: Content) -> int:
    """The characters there are to tokenize, a cheap stand-in for the token count before rendering."""
    if isinstance(content, Text):
        return len(content.text)
    if isinstance(content, PromptResponse):
        return len(content.prompt) + len(content.response)
    return sum(len(turn.content) for turn in content.turns)
