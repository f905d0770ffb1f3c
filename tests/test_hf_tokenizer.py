"""engine.checkpoint.hf_tokenizer: the generated Hugging Face tokenizer files load everywhere and
tokenize exactly like harmony."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from openai_harmony import (
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
)
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from classification import vocab
from engine.checkpoint import hf_tokenizer

TEST_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "test-vocab" / "shared"
# A quadratic merge derivation would take minutes; the real one takes a few seconds.
WRITE_BUDGET_S = 30.0


@dataclass(frozen=True)
class Written:
    directory: Path
    seconds: float


@dataclass(frozen=True)
class Loaded:
    """One way of loading the generated files, reduced to encode and decode."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


@pytest.fixture(scope="session")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    vocab.ensure_encodings_base(cache_dir=TEST_CACHE)
    directory = tmp_path_factory.mktemp("hf-tokenizer")
    started = time.perf_counter()
    hf_tokenizer.write_tokenizer_files(directory, cache_dir=TEST_CACHE)
    return Written(directory, time.perf_counter() - started)


@pytest.fixture(scope="session")
def raw_tokenizer(written: Written) -> Tokenizer:
    return Tokenizer.from_file(str(written.directory / "tokenizer.json"))


@pytest.fixture(scope="session")
def encoding() -> HarmonyEncoding:
    return vocab.load_harmony_encoding(cache_dir=TEST_CACHE)


def load_with_tokenizers(directory: Path) -> Loaded:
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return Loaded(
        encode=lambda text: tokenizer.encode(text).ids,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
    )


def load_with_fast_tokenizer(directory: Path) -> Loaded:
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    return Loaded(encode=tokenizer.encode, decode=tokenizer.decode)


def load_with_auto_tokenizer(directory: Path) -> Loaded:
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return Loaded(encode=tokenizer.encode, decode=tokenizer.decode)


LOADERS = {
    "tokenizers": load_with_tokenizers,
    "PreTrainedTokenizerFast": load_with_fast_tokenizer,
    "AutoTokenizer": load_with_auto_tokenizer,
}


@pytest.fixture(scope="session", params=sorted(LOADERS))
def loaded(request: pytest.FixtureRequest, written: Written) -> Loaded:
    return LOADERS[request.param](written.directory)


ORDINARY_TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — résumé; Größe, Straße, ÀÉÎÕÜ",
    "I ❤️ 🦀 and 👨‍👩‍👧‍👦 families 🇯🇵🏳️‍🌈",
    "日本語のテキストです。中文文本，한국어 텍스트",
    "مرحبا بالعالم — नमस्ते दुनिया — Привет, мир",
    "a  b   c\t\td\n\n\ne \r\n f    \n   ",
    "    leading and trailing    ",
    "\n\n\n",
    "1234567890 3.14159 -42 1,000,000 0x1F 2026-01-01",
    'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n',
    "if (a && b) { x += 1; } // ok\n\t</div>\r\n",
    "I'm, you're, they'll, it's, WE'VE, He'D, 'quoted'",
    "HTTPServerError camelCase snake_case ALLCAPS iPhone",
    "<|not a special token|> <| start |>",
]

SPECIAL_TEXTS = [
    "<|start|>user<|message|>Hello<|end|><|start|>assistant",
    '<|start|>assistant<|channel|>final<|message|>{"violation": 1}<|return|>',
    "<|start|>assistant to=functions.lookup<|channel|>commentary <|constrain|>json<|message|>{}<|call|>",
    "<|startoftext|>text<|endoftext|><|reserved_200013|>",
]


def conversation_tokens(encoding: HarmonyEncoding) -> list[int]:
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW).with_conversation_start_date("2026-01-01")
    developer = DeveloperContent.new().with_instructions("# Policy\n\nLabel 1 if the text is spam, else 0.\n")
    convo = Conversation.from_messages(
        [
            Message.from_role_and_content(Role.SYSTEM, system),
            Message.from_role_and_content(Role.DEVELOPER, developer),
            Message.from_role_and_content(Role.USER, "Win a FREE 🎁 now!!! Visit http://example.com  \n\n  ok?"),
        ]
    )
    return encoding.render_conversation_for_completion(convo, Role.ASSISTANT)


def test_files_are_written_quickly(written: Written) -> None:
    names = sorted(path.name for path in written.directory.iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert written.seconds < WRITE_BUDGET_S


def test_matches_transformers_tiktoken_converter(written: Written) -> None:
    """Byte-identical to what transformers' converter writes for o200k_harmony (how OpenAI's file was made)."""
    ranks = vocab.load_mergeable_ranks(cache_dir=TEST_CACHE)

    class LocalConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    specials = list(hf_tokenizer.special_tokens().values())
    converter = LocalConverter(vocab_file="o200k", pattern=hf_tokenizer.O200K_PATTERN, extra_special_tokens=specials)
    reference = written.directory.parent / "converter-tokenizer.json"
    converter.converted().save(str(reference), pretty=True)
    assert (written.directory / "tokenizer.json").read_bytes() == reference.read_bytes()


def test_tokenizer_json_round_trips_to_the_exact_vocab_file(written: Written, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, vocab.QUICKTOK_PACKAGE, None)  # the tokenizer.json must be the only source
    rebuilt = vocab.rebuild_o200k(model_dir=written.directory)
    assert hashlib.sha256(rebuilt).hexdigest() == vocab.O200K_SHA256
    assert rebuilt == (vocab.vocab_dir(TEST_CACHE) / vocab.O200K_FILE_NAME).read_bytes()


def test_published_small_files(written: Written) -> None:
    special_map = (written.directory / "special_tokens_map.json").read_text(encoding="utf-8")
    assert json.loads(special_map) == {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
    }
    assert len(special_map.encode()) == 98  # the published file's size
    config_text = (written.directory / "tokenizer_config.json").read_text(encoding="utf-8")
    config = json.loads(config_text)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|startoftext|>",
        "<|return|>",
        "<|endoftext|>",
    )
    assert config["added_tokens_decoder"]["200006"] == {
        "content": "<|start|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    assert list(config) == sorted(config)


def test_added_tokens_have_the_harmony_ids(raw_tokenizer: Tokenizer) -> None:
    tokenizer = raw_tokenizer
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 200_019
    expected = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|reserved_200000|>": 200000,
        "<|reserved_200001|>": 200001,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|reserved_200004|>": 200004,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|reserved_200011|>": 200011,
        "<|call|>": 200012,
        "<|reserved_200017|>": 200017,
        "<|endofprompt|>": 200018,
    }
    assert {content: tokenizer.token_to_id(content) for content in expected} == expected


def test_id_200018_is_named_differently_by_harmony(raw_tokenizer: Tokenizer, encoding: HarmonyEncoding) -> None:
    # The published HF file keeps tiktoken o200k_base's <|endofprompt|>; harmony calls the same id reserved. Harmony
    # never renders it, so only the name differs (and harmony encodes the text "<|endofprompt|>" as plain text).
    assert raw_tokenizer.id_to_token(200_018) == "<|endofprompt|>"
    assert encoding.decode_utf8([200_018]) == "<|reserved_200018|>"
    assert "<|endofprompt|>" not in encoding.special_tokens_set


def test_bpe_merges_order() -> None:
    vocab_ = {"a": 0, "b": 1, "ab": 2, "bb": 3, "abb": 4, "c": 5, "ac": 6, "cab": 7}
    assert hf_tokenizer.bpe_merges(vocab_) == [
        ["a", "b"],
        ["b", "b"],
        ["a", "bb"],  # for "abb": (rank a, rank bb) = (0, 3) sorts before (rank ab, rank b) = (2, 1)
        ["ab", "b"],
        ["a", "c"],
        ["c", "ab"],  # "ca" is not a token, so "cab" has only this split
    ]


@pytest.mark.parametrize("text", ORDINARY_TEXTS)
def test_ordinary_text_matches_harmony(loaded: Loaded, encoding: HarmonyEncoding, text: str) -> None:
    ids = encoding.encode(text, disallowed_special=())
    assert loaded.encode(text) == ids
    assert loaded.decode(ids) == text


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_special_token_text_matches_harmony(loaded: Loaded, encoding: HarmonyEncoding, text: str) -> None:
    ids = encoding.encode(text, allowed_special="all")
    assert loaded.encode(text) == ids
    assert loaded.decode(ids) == text


def test_known_published_encoding(loaded: Loaded) -> None:
    # From a third-party test against OpenAI's published tokenizer.json .
    text = "<|startoftext|><|start|><|message|>Hello World<|end|><|endoftext|>"
    assert loaded.encode(text) == [199998, 200006, 200008, 13225, 5922, 200007, 199999]


def test_rendered_conversation_round_trips(loaded: Loaded, encoding: HarmonyEncoding) -> None:
    tokens = conversation_tokens(encoding)
    assert tokens[:3] == [200006, 17360, 200008]
    assert tokens[-2:] == [200006, 173781]
    text = loaded.decode(tokens)
    assert text == encoding.decode_utf8(tokens)
    assert loaded.encode(text) == tokens


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
    | st.text(alphabet=st.sampled_from(list(" \t\n\r0123456789aZé'sS.,-/_日😀\u00a0\u3000")), max_size=40)
)
def test_random_text_matches_harmony(raw_tokenizer: Tokenizer, encoding: HarmonyEncoding, text: str) -> None:
    # Special-token markup is covered above; here it would only test that harmony was told to treat it as text.
    assume("<|" not in text)
    assert raw_tokenizer.encode(text).ids == encoding.encode(text, disallowed_special=())
