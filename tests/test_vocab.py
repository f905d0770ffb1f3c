"""classification.vocab: the exact o200k file rebuilt offline, its hash checks, the cache and the harmony encoding."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from classification import vocab
from classification.errors import VocabularyError

TEST_CACHE_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "test-vocab"


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """A vocab cache kept across runs (git-ignored), so only the first run pays for the rebuild."""
    cache = TEST_CACHE_ROOT / "shared"
    vocab.ensure_encodings_base(cache_dir=cache)
    return cache


@pytest.fixture(scope="session")
def o200k_tokens(shared_cache: Path) -> list[bytes]:
    return vocab.parse_tiktoken((vocab.vocab_dir(shared_cache) / vocab.O200K_FILE_NAME).read_bytes())


@pytest.fixture
def no_quicktok(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the quicktok-v1 package look uninstalled (a None entry is how Python marks a module as unimportable)."""
    monkeypatch.setitem(sys.modules, vocab.QUICKTOK_PACKAGE, None)


def write_minimal_tokenizer_json(path: Path, tokens: list[bytes]) -> None:
    """A tokenizer.json carrying only what the vocabulary reader uses: a BPE model and its vocab."""
    table = vocab.byte_to_unicode()
    entries = {"".join(table[byte] for byte in token): rank for rank, token in enumerate(tokens)}
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": entries, "merges": []}}), encoding="utf-8")


def quicktok_blob(entries: list[tuple[bytes, int]]) -> bytes:
    body = b"".join(struct.pack("<H", len(token)) + token + struct.pack("<I", rank) for token, rank in entries)
    return struct.pack("<I", len(entries)) + body


def test_quicktok_rebuild_is_byte_exact() -> None:
    data = vocab.rebuild_o200k()
    assert len(data) == vocab.O200K_SIZE
    assert hashlib.sha256(data).hexdigest() == vocab.O200K_SHA256
    assert data.startswith(b"IQ== 0\nIg== 1\n")
    assert data.endswith(b" 199997\n")


def test_quicktok_vocab_path_points_into_the_package() -> None:
    path = vocab.quicktok_vocab_path()
    assert path is not None
    assert path.parts[-3:] == ("quicktok", "data", "o200k.vocab")


def test_ensure_writes_verified_file_and_reuses_it(tmp_path: Path) -> None:
    directory = vocab.ensure_encodings_base(cache_dir=tmp_path)
    target = directory / vocab.O200K_FILE_NAME
    assert directory == tmp_path / "vocab"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == vocab.O200K_SHA256
    assert sorted(p.name for p in directory.iterdir()) == [vocab.O200K_FILE_NAME]  # no temporary left behind
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    stamp = target.stat().st_mtime_ns
    vocab.ensure_encodings_base(cache_dir=tmp_path)
    assert target.stat().st_mtime_ns == stamp


def test_corrupt_cached_file_is_rebuilt(tmp_path: Path) -> None:
    target = vocab.vocab_dir(tmp_path) / vocab.O200K_FILE_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"IQ== 0\n")
    vocab.ensure_encodings_base(cache_dir=tmp_path)
    vocab.verify_vocab_file(target)


def test_valid_cached_file_needs_no_source(shared_cache: Path, no_quicktok: None, tmp_path: Path) -> None:
    # An operator may copy OpenAI's file into the cache by hand; it must be used as is.
    assert vocab.ensure_encodings_base(model_dir=tmp_path, cache_dir=shared_cache) == shared_cache / "vocab"


def test_wrong_hash_file_names_both_hashes(shared_cache: Path, tmp_path: Path) -> None:
    truncated = (vocab.vocab_dir(shared_cache) / vocab.O200K_FILE_NAME).read_bytes()[:-20]
    bad = tmp_path / vocab.O200K_FILE_NAME
    bad.write_bytes(truncated)
    with pytest.raises(VocabularyError) as caught:
        vocab.verify_vocab_file(bad)
    message = str(caught.value)
    assert f"computed={hashlib.sha256(truncated).hexdigest()}" in message
    assert f"expected={vocab.O200K_SHA256}" in message
    assert str(bad) in message


def test_missing_vocab_file_is_a_vocabulary_error(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="cannot read"):
        vocab.verify_vocab_file(tmp_path / vocab.O200K_FILE_NAME)


def test_tokenizer_json_of_another_vocabulary_is_rejected(
    o200k_tokens: list[bytes], tmp_path: Path, no_quicktok: None
) -> None:
    swapped = [o200k_tokens[1], o200k_tokens[0], *o200k_tokens[2:]]
    write_minimal_tokenizer_json(tmp_path / "tokenizer.json", swapped)
    with pytest.raises(VocabularyError) as caught:
        vocab.rebuild_o200k(model_dir=tmp_path)
    message = str(caught.value)
    assert f"computed={hashlib.sha256(vocab.tiktoken_bytes(swapped)).hexdigest()}" in message
    assert f"expected={vocab.O200K_SHA256}" in message
    assert "tokenizer.json" in message


def test_bad_tokenizer_json_does_not_fall_back_to_quicktok(o200k_tokens: list[bytes], tmp_path: Path) -> None:
    # quicktok is installed here; a checkpoint whose tokenizer is not o200k must still be refused.
    write_minimal_tokenizer_json(tmp_path / "tokenizer.json", [o200k_tokens[1], o200k_tokens[0], *o200k_tokens[2:]])
    with pytest.raises(VocabularyError, match="computed="):
        vocab.ensure_encodings_base(model_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_minimal_tokenizer_json_rebuilds_exactly(o200k_tokens: list[bytes], tmp_path: Path, no_quicktok: None) -> None:
    write_minimal_tokenizer_json(tmp_path / "tokenizer.json", o200k_tokens)
    assert hashlib.sha256(vocab.rebuild_o200k(model_dir=tmp_path)).hexdigest() == vocab.O200K_SHA256


def test_no_source_gives_actionable_error(tmp_path: Path, no_quicktok: None) -> None:
    with pytest.raises(VocabularyError) as caught:
        vocab.ensure_encodings_base(model_dir=tmp_path, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert str(tmp_path / "tokenizer.json") in message
    assert "quicktok-v1" in message
    assert "pip install quicktok-v1==0.4.0" in message
    assert vocab.O200K_SHA256 in message
    assert not (tmp_path / "cache" / "vocab" / vocab.O200K_FILE_NAME).exists()


def test_no_source_without_model_dir(tmp_path: Path, no_quicktok: None) -> None:
    with pytest.raises(VocabularyError, match="no model directory was given"):
        vocab.ensure_encodings_base(cache_dir=tmp_path)


def test_tokenizer_json_missing_ids_is_rejected(o200k_tokens: list[bytes], tmp_path: Path) -> None:
    write_minimal_tokenizer_json(tmp_path / "tokenizer.json", o200k_tokens[:-1])
    with pytest.raises(VocabularyError, match="first missing: 199997"):
        vocab.read_tokenizer_json(tmp_path / "tokenizer.json")


def test_tokenizer_json_of_other_model_type_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": {}}}))
    with pytest.raises(VocabularyError, match="Unigram"):
        vocab.read_tokenizer_json(tmp_path / "tokenizer.json")


def test_unreadable_tokenizer_json_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(VocabularyError, match=r"not a readable tokenizer\.json"):
        vocab.read_tokenizer_json(tmp_path / "tokenizer.json")


def test_quicktok_reader_orders_by_rank(tmp_path: Path) -> None:
    path = tmp_path / "tiny.vocab"
    path.write_bytes(quicktok_blob([(b"b", 1), (b"a", 0), (b"ab", 2)]))
    assert vocab.read_quicktok_vocab(path) == [b"a", b"b", b"ab"]


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        (quicktok_blob([(b"a", 0), (b"b", 1)])[:-2], "truncated"),
        (quicktok_blob([(b"a", 0), (b"b", 1)]) + b"\0", "unexpected bytes"),
        (quicktok_blob([(b"a", 0), (b"b", 0)]), "not exactly 0..1"),
    ],
)
def test_quicktok_reader_rejects_malformed_files(tmp_path: Path, blob: bytes, problem: str) -> None:
    path = tmp_path / "bad.vocab"
    path.write_bytes(blob)
    with pytest.raises(VocabularyError, match=problem):
        vocab.read_quicktok_vocab(path)


@given(st.lists(st.binary(min_size=1, max_size=12), max_size=30))
def test_tiktoken_format_round_trips(tokens: list[bytes]) -> None:
    assert vocab.parse_tiktoken(vocab.tiktoken_bytes(tokens)) == tokens


def test_byte_to_unicode_is_a_printable_bijection() -> None:
    table = vocab.byte_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in table.values())
    assert (table[ord("A")], table[ord(" ")], table[ord("\n")]) == ("A", "Ġ", "Ċ")


def test_mergeable_ranks(shared_cache: Path) -> None:
    ranks = vocab.load_mergeable_ranks(cache_dir=shared_cache)
    assert len(ranks) == vocab.O200K_MERGEABLE_COUNT
    assert sorted(ranks.values()) == list(range(vocab.O200K_MERGEABLE_COUNT))
    # Ids observed in published harmony prompt dumps.
    assert ranks[b"system"] == 17360
    assert ranks[b"assistant"] == 173781
    assert ranks[b" "] == 220
    assert (ranks[b"0"], ranks[b"1"]) == (15, 16)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(vocab.CACHE_ENV, str(tmp_path))
    assert vocab.default_cache_dir() == tmp_path
    assert vocab.vocab_dir() == tmp_path / "vocab"
    monkeypatch.delenv(vocab.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert vocab.default_cache_dir() == tmp_path / "home" / ".cache" / "safeguard-appliance"


def test_load_harmony_encoding_is_local_and_memoized(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stale value proves the function sets it; monkeypatch restores the original afterwards.
    monkeypatch.setenv(vocab.ENCODINGS_BASE_ENV, "/nonexistent")
    vocab.load_harmony_encoding.cache_clear()
    encoding = vocab.load_harmony_encoding(cache_dir=shared_cache)
    assert os.environ[vocab.ENCODINGS_BASE_ENV] == str(shared_cache / "vocab")
    assert vocab.load_harmony_encoding(cache_dir=shared_cache) is encoding
    assert (encoding.encode("system"), encoding.encode("assistant")) == ([17360], [173781])
    assert set(encoding.stop_tokens_for_assistant_actions()) == {200002, 200012}  # order varies by process
