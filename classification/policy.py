"""The policy file: TOML front matter between `+++` lines, then the policy itself in Markdown.

The front matter is metadata for the appliance (id, version label, output format, default reasoning effort); only
the Markdown body goes to the model, as the harmony developer message. A policy version is identified by the
sha256 of its normalised file text, so the same words always name the same version and any edit is a new one.

What a person reads back (the id, the version label, the title) must show what it is: ids are lowercase ASCII,
and the version and title refuse control, bidi-control, zero-width and other invisible characters (a U+202E in a
version label would display it reversed in every listing). Front matter is metadata of a few lines, so it is
capped in size, and TOML nested too deep for the parser is refused like any other invalid TOML.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from classification.errors import ApplianceError

EFFORTS = ("low", "medium", "high")
OUTPUT_FORMATS = ("binary", "json")
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RULE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
# OpenAI's guidance for gpt-oss-safeguard: best at 400 to 600 tokens, still reasonable near 10,000.
TUNED_TOKENS = (400, 10_000)
_FENCE = "+++"
MAX_FRONT_MATTER_CHARS = 16_384
MAX_LABEL_CHARS = 128  # version labels and titles
# Unicode categories of characters that do not show as themselves: controls, format characters (bidi controls,
# zero-width characters, U+061C), line and paragraph separators, surrogates, private use and unassigned.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


class PolicyError(ApplianceError):
    """A policy file that cannot be used; every problem is listed."""


class PolicyRefError(ApplianceError):
    """A policy reference that names no policy, or names a version with nothing after the '@'."""


@dataclass(frozen=True)
class PolicyRef:
    """A registry reference: "id" (the active version) or "id@version", the version a label or a sha256 prefix."""

    policy_id: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> PolicyRef:
        policy_id, sep, version = text.strip().partition("@")
        if not policy_id:
            raise PolicyRefError('no policy given: a policy ref is "<id>" or "<id>@<version>"')
        if sep and not version:
            raise PolicyRefError(f"policy ref {text!r} names no version after '@'")
        return cls(policy_id, version or None)

    def __str__(self) -> str:
        return self.policy_id if self.version is None else f"{self.policy_id}@{self.version}"


@dataclass(frozen=True)
class OutputSpec:
    """What the policy asks the model to answer, and so how its final message is parsed."""

    format: str  # "binary": exactly 0 or 1; "json": {"violation": 0|1, ...}
    categories: tuple[str, ...] = ()
    rule_ids: tuple[str, ...] = ()
    confidence: bool = False
    rationale: bool = False


@dataclass(frozen=True)
class Policy:
    id: str
    version: str
    title: str
    body: str  # the Markdown the model reads
    output: OutputSpec
    reasoning_effort: str = "medium"
    owner: str = ""
    notes: str = ""
    normalise_input: bool = False  # NFKC and no invisible characters in content, before classification
    text: str = field(default="", repr=False)  # the normalised file, front matter included

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def normalise(text: str) -> str:
    """One canonical text per policy: LF line ends, no BOM, trailing whitespace trimmed, one final newline."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n")) + "\n"


def _split(text: str, source: str) -> tuple[str, str]:
    lines = text.split("\n")
    if not lines or lines[0] != _FENCE:
        raise PolicyError([f"{source}: a policy starts with a '+++' line, then TOML front matter, then '+++'"])
    try:
        end = lines.index(_FENCE, 1)
    except ValueError:
        raise PolicyError([f"{source}: the front matter opened on line 1 is never closed with '+++'"]) from None
    return "\n".join(lines[1:end]), "\n".join(lines[end + 1:]).strip("\n")


def _str_list(meta: dict[str, Any], key: str, source: str, problems: list[str]) -> tuple[str, ...]:
    value = meta.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{source}: output.{key} must be a list of strings")
        return ()
    bad = [v for v in value if not RULE_ID_PATTERN.match(v)]
    if bad:
        problems.append(f"{source}: output.{key} has invalid ids {bad} (letters, digits, '.', '_', '-')")
    if len(set(value)) != len(value):
        problems.append(f"{source}: output.{key} lists an id twice")
    return tuple(value)


def _output_spec(raw: Any, source: str, problems: list[str]) -> OutputSpec:
    if not isinstance(raw, dict):
        problems.append(f"{source}: missing [output] table (format = \"binary\" or \"json\")")
        return OutputSpec("binary")
    fmt = raw.get("format")
    if fmt not in OUTPUT_FORMATS:
        problems.append(f"{source}: output.format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
        return OutputSpec("binary")
    unknown = set(raw) - {"format", "categories", "rule_ids", "confidence", "rationale"}
    if unknown:
        problems.append(f"{source}: unknown [output] keys: {', '.join(sorted(unknown))}")
    if fmt == "binary":
        extra = sorted(set(raw) & {"categories", "rule_ids", "confidence", "rationale"})
        if extra:
            problems.append(f"{source}: a binary policy answers only 0 or 1; remove output.{', output.'.join(extra)}")
        return OutputSpec("binary")
    flags = {}
    for key in ("confidence", "rationale"):
        flags[key] = raw.get(key, False)
        if not isinstance(flags[key], bool):
            problems.append(f"{source}: output.{key} must be true or false")
    return OutputSpec("json", _str_list(raw, "categories", source, problems),
                      _str_list(raw, "rule_ids", source, problems), bool(flags["confidence"]),
                      bool(flags["rationale"]))


def _required_str(meta: dict[str, Any], key: str, source: str, problems: list[str]) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{source}: front matter needs {key} = \"...\"")
        return ""
    return value.strip()


def hidden_character(value: str) -> str | None:
    """A description of the first character of `value` that does not show as itself, or None."""
    for at, char in enumerate(value):
        if unicodedata.category(char) in _HIDDEN_CATEGORIES:
            return f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')} at position {at + 1}"
    return None


def _label(meta: dict[str, Any], key: str, source: str, problems: list[str]) -> str:
    """A required one-line string a person reads in listings: visible characters only, bounded length."""
    value = _required_str(meta, key, source, problems)
    hidden = hidden_character(value)
    if hidden is not None:
        problems.append(f"{source}: {key} must be visible characters only (no control, bidi or zero-width "
                        f"characters); it has {hidden}")
    if len(value) > MAX_LABEL_CHARS:
        problems.append(f"{source}: {key} is {len(value)} characters; at most {MAX_LABEL_CHARS}")
    return value


def _front_matter(front: str, source: str) -> dict[str, Any]:
    if len(front) > MAX_FRONT_MATTER_CHARS:
        raise PolicyError([f"{source}: the front matter is {len(front):,} characters; at most "
                           f"{MAX_FRONT_MATTER_CHARS:,} (it holds metadata only: the policy goes after '+++')"])
    try:
        return tomllib.loads(front)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([f"{source}: front matter is not valid TOML ({exc})"]) from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and inline tables
        raise PolicyError([f"{source}: front matter is not valid TOML (arrays or tables nested too deeply)"]) from None
    except ValueError as exc:  # what else tomllib raises on odd input (a value out of range)
        raise PolicyError([f"{source}: front matter is not valid TOML ({exc})"]) from None


def parse_policy(text: str, source: str = "policy") -> Policy:
    """Parse and validate a policy file; raises PolicyError listing every problem found."""
    text = normalise(text)
    front, body = _split(text, source)
    meta = _front_matter(front, source)
    problems: list[str] = []
    policy_id = _required_str(meta, "id", source, problems)
    if policy_id and not ID_PATTERN.match(policy_id):
        problems.append(f"{source}: id {policy_id!r} must be lowercase letters, digits and hyphens (max 63)")
    version = _label(meta, "version", source, problems)
    title = _label(meta, "title", source, problems)
    effort = meta.get("reasoning_effort", "medium")
    if effort not in EFFORTS:
        problems.append(f"{source}: reasoning_effort must be one of {', '.join(EFFORTS)}, got {effort!r}")
    normalise_input = meta.get("normalise_input", False)
    if not isinstance(normalise_input, bool):
        problems.append(f"{source}: normalise_input must be true or false")
    unknown = set(meta) - {"id", "version", "title", "owner", "notes", "reasoning_effort", "output",
                           "normalise_input"}
    if unknown:
        problems.append(f"{source}: unknown front matter keys: {', '.join(sorted(unknown))}")
    output = _output_spec(meta.get("output"), source, problems)
    if not body.strip():
        problems.append(f"{source}: the policy body (after the front matter) is empty")
    for rule in output.rule_ids:
        if rule not in body:
            problems.append(f"{source}: rule id {rule} is declared in [output] but never appears in the policy text")
    if problems:
        raise PolicyError(problems)
    return Policy(policy_id, version, title, body, output, effort, str(meta.get("owner", "")),
                  str(meta.get("notes", "")), normalise_input is True, text)


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([f"{path}: cannot read policy ({exc})"]) from None
    return parse_policy(text, source=path.name)


def length_warning(token_count: int) -> str | None:
    """A warning when the policy is outside the length range the model was tuned for."""
    low, high = TUNED_TOKENS
    if token_count < low:
        return (f"policy is {token_count} tokens; gpt-oss-safeguard does best with 400 to 600 "
                "(add definitions and examples)")
    if token_count > high:
        return f"policy is {token_count} tokens; beyond {high:,} the model's accuracy drops (split or compress it)"
    return None
