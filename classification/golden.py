"""Golden sets: a policy's labelled examples, one JSON object a line beside the policy (`<id>.golden.jsonl`).

    {"id": "smoke-001", "kind": "text", "content": "...", "violation": 1, "category": "BN1", "rule_id": "BN1.a",
     "note": "..."}

`kind` is `text` (content is a string), `prompt_response` (`{"prompt": ..., "response": ...}`) or `conversation`
(a list of `{"role": ..., "content": ...}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from classification.content import Chat, Content, PromptResponse, Text, Turn
from classification.errors import ApplianceError

KINDS = ("text", "prompt_response", "conversation")


class GoldenSetError(ApplianceError):
    """A golden set line that cannot be read; every bad line is listed."""


@dataclass(frozen=True)
class GoldenItem:
    id: str
    kind: str
    content: Content
    violation: bool
    category: str | None = None
    rule_id: str | None = None
    note: str = ""


def golden_path(policy_path: Path) -> Path:
    """Where the golden set of the policy file at `policy_path` lives."""
    return policy_path.with_name(f"{policy_path.stem}.golden.jsonl")


def content_from_json(kind: str, raw: Any) -> Content:
    if kind == "text":
        return Text(raw)
    if kind == "prompt_response":
        return PromptResponse(raw["prompt"], raw["response"])
    if kind == "conversation":
        return Chat(tuple(Turn(t["role"], t["content"]) for t in raw))
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def parse_golden(text: str, source: str = "golden set") -> list[GoldenItem]:
    items: list[GoldenItem] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            items.append(GoldenItem(raw["id"], raw["kind"], content_from_json(raw["kind"], raw["content"]),
                                    bool(raw["violation"]), raw.get("category"), raw.get("rule_id"),
                                    raw.get("note") or ""))
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{source} line {number}: {type(exc).__name__}: {exc}")
    if problems:
        raise GoldenSetError(problems)
    return items


def load_golden(path: Path) -> list[GoldenItem]:
    return parse_golden(Path(path).read_text(encoding="utf-8"), str(path))
