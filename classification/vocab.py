"""The o200k vocabulary, rebuilt offline, and the harmony encoding loaded from it.

openai-harmony reads `o200k_base.tiktoken` from `$TIKTOKEN_ENCODINGS_BASE` (checking its sha256) and otherwise
downloads it. The appliance never downloads: it rebuilds the exact file from a checkpoint's `tokenizer.json` or, when
no checkpoint is at hand, from the binary copy inside the `quicktok-v1` wheel, verifies the hash, and caches it under
`<cache>/vocab/`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import openai_harmony
from openai_harmony import HarmonyEncoding, HarmonyEncodingName

from classification.errors import VocabularyError

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_FILE_NAME = "o200k_base.tiktoken"
O200K_SIZE = 3_613_922
# Mergeable (BPE) tokens have ranks 0..199997; ids from 199998 up are special tokens.
O200K_MERGEABLE_COUNT = 199_998

QUICKTOK_PACKAGE = "quicktok"
QUICKTOK_VOCAB = Path("data") / "o200k.vocab"
CACHE_ENV = "APPLIANCE_CACHE_DIR"
ENCODINGS_BASE_ENV = "TIKTOKEN_ENCODINGS_BASE"


@dataclass(frozen=True)
class VocabSource:
    """Where a vocabulary can be read from, and how."""

    description: str
    path: Path
    read: Callable[[Path], list[bytes]]


def default_cache_dir() -> Path:
    """The appliance cache root: `$APPLIANCE_CACHE_DIR`, else `~/.cache/safeguard-appliance`."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "safeguard-appliance"


def vocab_dir(cache_dir: Path | None = None) -> Path:
    """The directory that holds (or will hold) the cached `o200k_base.tiktoken`."""
    return (cache_dir if cache_dir is not None else default_cache_dir()) / "vocab"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_o200k_bytes(data: bytes, origin: str) -> None:
    """Raise VocabularyError unless `data` is exactly OpenAI's `o200k_base.tiktoken`."""
    computed = sha256_hex(data)
    if computed != O200K_SHA256:
        raise VocabularyError(
            f"{origin}: not the o200k_base vocabulary: sha256 computed={computed}, expected={O200K_SHA256} "
            f"({len(data)} bytes, expected {O200K_SIZE})"
        )


def verify_vocab_file(path: Path) -> None:
    """Raise VocabularyError unless `path` is a byte-exact `o200k_base.tiktoken`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VocabularyError(f"{path}: cannot read vocabulary file: {exc.strerror or exc}") from exc
    check_o200k_bytes(data, str(path))


def tiktoken_bytes(tokens: list[bytes]) -> bytes:
    """Serialize tokens (index = rank) in tiktoken's `base64(token) rank` line format."""
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(tokens))


def parse_tiktoken(data: bytes) -> list[bytes]:
    """Tokens of a tiktoken vocabulary file, index = rank (ranks must be 0..n-1 in order)."""
    tokens: list[bytes] = []
    for line in data.splitlines():
        encoded, rank = line.split(b" ")
        if int(rank) != len(tokens):
            raise VocabularyError(f"tiktoken vocabulary: rank {int(rank)} out of order at line {len(tokens) + 1}")
        tokens.append(base64.b64decode(encoded))
    return tokens


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    # The remaining bytes (controls, space, soft hyphen...) move to 256+ in byte order, so they stay visible.
    for shifted, byte in enumerate(b for b in range(256) if b not in mapping):
        mapping[byte] = chr(256 + shifted)
    return mapping


def read_tokenizer_json(path: Path) -> list[bytes]:
    """Mergeable tokens of a Hugging Face byte-level BPE `tokenizer.json`, index = rank."""
    try:
        model = json.loads(path.read_bytes())["model"]
        vocab: dict[str, int] = model["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VocabularyError(f"{path}: not a readable tokenizer.json ({type(exc).__name__}: {exc})") from exc
    if model.get("type") != "BPE":
        raise VocabularyError(f"{path}: model type is {model.get('type')!r}, expected a byte-level 'BPE' model")
    unicode_to_byte = {ord(char): chr(byte) for byte, char in byte_to_unicode().items()}
    by_rank: dict[int, bytes] = {}
    for text, rank in vocab.items():
        # Added tokens may also appear in model.vocab; only the mergeable ranks make up o200k_base.
        if not 0 <= rank < O200K_MERGEABLE_COUNT:
            continue
        try:
            by_rank[rank] = text.translate(unicode_to_byte).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise VocabularyError(f"{path}: token {text!r} (id {rank}) is not byte-level BPE text") from exc
    return ranked_tokens(by_rank, O200K_MERGEABLE_COUNT, path)


def read_quicktok_vocab(path: Path) -> list[bytes]:
    """Tokens of quicktok's binary vocabulary (little-endian u32 count, then u16 len, bytes, u32 rank), index = rank."""
    data = path.read_bytes()
    by_rank: dict[int, bytes] = {}
    try:
        (count,) = struct.unpack_from("<I", data, 0)
        offset = 4
        for _ in range(count):
            (length,) = struct.unpack_from("<H", data, offset)
            start = offset + 2
            (rank,) = struct.unpack_from("<I", data, start + length)
            by_rank[rank] = data[start : start + length]
            offset = start + length + 4
    except struct.error as exc:
        raise VocabularyError(f"{path}: truncated quicktok vocabulary ({exc})") from exc
    if offset != len(data):
        raise VocabularyError(f"{path}: {len(data) - offset} unexpected bytes after {count} quicktok entries")
    return ranked_tokens(by_rank, count, path)


def ranked_tokens(by_rank: dict[int, bytes], count: int, origin: Path) -> list[bytes]:
    """Tokens ordered by rank, insisting that the ranks are exactly 0..count-1."""
    missing = [rank for rank in range(count) if rank not in by_rank]
    if missing or len(by_rank) != count:
        first = f" (first missing: {missing[0]})" if missing else ""
        raise VocabularyError(f"{origin}: ranks are not exactly 0..{count - 1}{first}")
    return [by_rank[rank] for rank in range(count)]


def quicktok_vocab_path() -> Path | None:
    """The o200k vocabulary file inside the installed quicktok-v1 package, or None when it is not installed."""
    # find_spec locates the package without importing it (and so without loading its native extension).
    spec = importlib.util.find_spec(QUICKTOK_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / QUICKTOK_VOCAB
        if candidate.is_file():
            return candidate
    return None


def vocab_sources(model_dir: Path | None) -> tuple[list[VocabSource], list[str]]:
    """The sources to rebuild from, best first, and a line for each one that was looked for and not found."""
    sources: list[VocabSource] = []
    absent: list[str] = []
    if model_dir is None:
        absent.append("no model directory was given, so no tokenizer.json was read")
    elif (tokenizer_json := model_dir / "tokenizer.json").is_file():
        sources.append(VocabSource("the checkpoint's tokenizer.json", tokenizer_json, read_tokenizer_json))
    else:
        absent.append(f"{tokenizer_json} does not exist")
    quicktok = quicktok_vocab_path()
    if quicktok is not None:
        sources.append(VocabSource("the quicktok-v1 package", quicktok, read_quicktok_vocab))
    else:
        absent.append(f"the quicktok-v1 package ({QUICKTOK_PACKAGE}/{QUICKTOK_VOCAB.as_posix()}) is not installed")
    return sources, absent


def write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers (harmony, other processes) never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # mkstemp creates the file 0600; these files are world-readable data like any other install file.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def rebuild_o200k(model_dir: Path | None = None) -> bytes:
    """The exact bytes of `o200k_base.tiktoken`, rebuilt from the first available source and hash-checked."""
    sources, absent = vocab_sources(model_dir)
    if not sources:
        raise VocabularyError(
            [
                f"no source for the o200k vocabulary ({O200K_FILE_NAME}); nothing is downloaded. Looked for:",
                *absent,
                "Fix: install the pinned quicktok-v1 wheel (pip install quicktok-v1==0.4.0), pass the checkpoint "
                f"directory that holds tokenizer.json, or copy OpenAI's {O200K_FILE_NAME} (sha256 {O200K_SHA256}) "
                f"into the vocab cache directory ($APPLIANCE_CACHE_DIR/vocab)",
            ]
        )
    # A checkpoint's tokenizer.json that is not o200k is an error, not a reason to fall back: the model would be
    # served with a vocabulary it was not trained on.
    source = sources[0]
    data = tiktoken_bytes(source.read(source.path))
    check_o200k_bytes(data, f"vocabulary rebuilt from {source.description} ({source.path})")
    return data


def ensure_encodings_base(model_dir: Path | None = None, cache_dir: Path | None = None) -> Path:
    """A directory holding a verified `o200k_base.tiktoken`, fit for `$TIKTOKEN_ENCODINGS_BASE`.

    A cached file is reused when its hash matches and rebuilt over otherwise (the cache holds only derived data).
    """
    directory = vocab_dir(cache_dir)
    target = directory / O200K_FILE_NAME
    if target.is_file():
        try:
            verify_vocab_file(target)
            return directory
        except VocabularyError:
            pass
    data = rebuild_o200k(model_dir)
    try:
        write_atomically(target, data)
    except OSError as exc:
        raise VocabularyError(
            f"cannot write {target}: {exc.strerror or exc}; set ${CACHE_ENV} to a writable directory"
        ) from exc
    return directory


def load_mergeable_ranks(model_dir: Path | None = None, cache_dir: Path | None = None) -> dict[bytes, int]:
    """The o200k mergeable ranks (token bytes -> rank), from the verified cached file."""
    path = ensure_encodings_base(model_dir, cache_dir) / O200K_FILE_NAME
    return {token: rank for rank, token in enumerate(parse_tiktoken(path.read_bytes()))}


@functools.cache
def load_harmony_encoding(model_dir: Path | None = None, cache_dir: Path | None = None) -> HarmonyEncoding:
    """openai-harmony's gpt-oss encoding, loaded from the local vocabulary only (memoized per process).

    `$TIKTOKEN_ENCODINGS_BASE` stays set for the life of the process on purpose: other harmony users in it (an
    inference engine's own renderer, for one) then load offline too. With it set harmony has no download fallback.
    """
    os.environ[ENCODINGS_BASE_ENV] = str(ensure_encodings_base(model_dir, cache_dir))
    return openai_harmony.load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
