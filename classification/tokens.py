"""The o200k_harmony special tokens the classification contract names, and the turn's stop tokens."""

from __future__ import annotations

START_OF_TEXT = 199998
END_OF_TEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
# o200k_harmony: ranks 0..199997 are ordinary (BPE) tokens, 199998..201087 special ones (vocab_size 201,088).
FIRST_SPECIAL = 199998
VOCAB_SIZE = 201_088

TOKEN_NAMES = {
    START_OF_TEXT: "<|startoftext|>",
    END_OF_TEXT: "<|endoftext|>",
    RETURN: "<|return|>",
    CONSTRAIN: "<|constrain|>",
    CHANNEL: "<|channel|>",
    START: "<|start|>",
    END: "<|end|>",
    MESSAGE: "<|message|>",
    CALL: "<|call|>",
}
# The tokens that end an assistant turn; every executor stops on them unless told otherwise.
STOP_TOKEN_IDS = (RETURN, CALL)
STOP_TOKENS = frozenset(STOP_TOKEN_IDS)


def token_name(token: int) -> str:
    """A readable name for a token in anomaly details."""
    if token in TOKEN_NAMES:
        return TOKEN_NAMES[token]
    if FIRST_SPECIAL <= token < VOCAB_SIZE:
        return f"<|reserved_{token}|>"
    # str() of an int past 4,300 digits raises ValueError, and no real id is near 64 bits anyway.
    if -(2**63) <= token < 2**63:
        return f"token {token}"
    return "a token id beyond 64 bits"
