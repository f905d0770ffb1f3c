"""Hugging Face tokenizer files for a gpt-oss checkpoint, generated offline from the o200k vocabulary.

Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` in the form OpenAI publishes with its
checkpoints (the output of transformers' tiktoken converter for o200k_harmony): a byte-level BPE over ranks
0..199997 with merges derived from the ranks, the o200k split regex, and the harmony special tokens 199998..200018.
Used where a checkpoint arrives without them (synthetic test checkpoints, stripped copies).
"""

from __future__ import annotations

import json
from pathlib import Path

from classification.vocab import byte_to_unicode, load_mergeable_ranks, write_atomically

# tiktoken's o200k_base split pattern, as harmony compiles it (alternatives joined with "|").
O200K_PATTERN = "|".join(
    (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    )
)

FIRST_SPECIAL_ID = 199_998
LAST_SPECIAL_ID = 200_018
NAMED_SPECIAL_TOKENS = {
    199_998: "<|startoftext|>",
    199_999: "<|endoftext|>",
    200_002: "<|return|>",
    200_003: "<|constrain|>",
    200_005: "<|channel|>",
    200_006: "<|start|>",
    200_007: "<|end|>",
    200_008: "<|message|>",
    200_012: "<|call|>",
    200_018: "<|endofprompt|>",
}
SPECIAL_TOKENS_MAP = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
# transformers' "no limit" sentinel (int(1e30)); the published config carries this exact value.
UNLIMITED_LENGTH = 1000000000000000019884624838656


def special_tokens() -> dict[int, str]:
    """Id -> content of the added tokens in the published tokenizer.json (reserved names fill the gaps)."""
    return {
        token_id: NAMED_SPECIAL_TOKENS.get(token_id, f"<|reserved_{token_id}|>")
        for token_id in range(FIRST_SPECIAL_ID, LAST_SPECIAL_ID + 1)
    }


def bpe_merges(vocab: dict[str, int]) -> list[list[str]]:
    """Merges equivalent to tiktoken's rank-ordered BPE: every split of a token into two vocabulary tokens.

    Ordered by the merged token's rank, then by the ranks of the left and right parts (transformers' converter
    order). `vocab` is in rank order and maps byte-level text to rank; because the byte -> character map is one to
    one, splitting the text at character i is the same as splitting the bytes at byte i.
    """
    merges: list[list[str]] = []
    rank_of = vocab.get  # a local name: this loop runs ~1.4 million times
    for text in vocab:
        splits = []
        for index in range(1, len(text)):
            left_rank = rank_of(text[:index])
            if left_rank is None:
                continue
            right_rank = rank_of(text[index:])
            if right_rank is not None:
                splits.append((left_rank, right_rank, index))
        splits.sort()
        merges.extend([text[:index], text[index:]] for _, _, index in splits)
    return merges


def added_token(token_id: int, content: str) -> dict[str, object]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def tokenizer_json(ranks: dict[bytes, int]) -> dict[str, object]:
    """The tokenizer.json document, keys in the order the `tokenizers` library writes them."""
    table = str.maketrans({chr(byte): char for byte, char in byte_to_unicode().items()})
    in_rank_order = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {token.decode("latin-1").translate(table): rank for token, rank in in_rank_order}
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(token_id, content) for token_id, content in special_tokens().items()],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
                # The regex above already split the text, so ByteLevel only maps bytes (use_regex off).
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            # tiktoken emits a whole pre-token as one id when it is in the vocabulary; ignore_merges does the same.
            "ignore_merges": True,
            "vocab": vocab,
            "merges": bpe_merges(vocab),
        },
    }


def tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json as transformers 4.55 saved it for the published checkpoints (keys sorted)."""
    decoder = {
        str(token_id): {key: value for key, value in sorted(added_token(token_id, content).items()) if key != "id"}
        for token_id, content in special_tokens().items()
    }
    return {
        "added_tokens_decoder": decoder,
        **SPECIAL_TOKENS_MAP,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": UNLIMITED_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_json(path: Path, document: dict[str, object], *, sort_keys: bool, newline: bool) -> None:
    text = json.dumps(document, indent=2, ensure_ascii=False, sort_keys=sort_keys) + ("\n" if newline else "")
    write_atomically(path, text.encode("utf-8"))


def write_tokenizer_files(out_dir: Path, cache_dir: Path | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    ranks = load_mergeable_ranks(cache_dir=cache_dir)
    # Formatting follows the producers of the published files: `tokenizers` (pretty, no final newline) for
    # tokenizer.json, transformers (sorted keys, final newline) for the two small files.
    write_json(out_dir / "tokenizer.json", tokenizer_json(ranks), sort_keys=False, newline=False)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(), sort_keys=True, newline=True)
    write_json(out_dir / "special_tokens_map.json", SPECIAL_TOKENS_MAP, sort_keys=True, newline=True)
