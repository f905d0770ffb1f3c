"""The bundled policy library: every policy parses, sits in its token range, and its golden set is well formed."""

import json
from pathlib import Path

import pytest

from classification.policy import load_policy
from classification.vocab import load_harmony_encoding

LIBRARY = Path(__file__).resolve().parents[1] / "policies"
POLICY_FILES = sorted(p for p in LIBRARY.glob("*.md") if p.name != "README.md")
# The smoke policy is a fixture for the tiny demo model; it is deliberately short and exempt from the length range.
LIBRARY_FILES = [p for p in POLICY_FILES if p.stem != "smoke"]
KINDS = {"text", "prompt_response", "conversation"}


def test_the_library_has_the_eight_policies():
    ids = {load_policy(p).id for p in POLICY_FILES}
    assert {"spam-scams", "harassment-hate", "self-harm", "violent-extremism", "personal-data-leakage",
            "prompt-injection-jailbreak", "regulated-financial-advice", "health-misinformation"} <= ids


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: p.stem)
def test_policy_validates_and_fits_its_token_range(path):
    policy = load_policy(path)
    assert policy.id == path.stem
    tokens = len(load_harmony_encoding().encode(policy.body, disallowed_special=()))
    assert 400 <= tokens <= 900, f"{policy.id} is {tokens} tokens"


def _valid_content(kind, content):
    if kind == "text":
        return isinstance(content, str) and content.strip() != ""
    if kind == "prompt_response":
        return isinstance(content, dict) and set(content) == {"prompt", "response"} and all(
            isinstance(v, str) and v.strip() for v in content.values())
    return isinstance(content, list) and len(content) >= 2 and all(
        isinstance(t, dict) and t.get("role") in ("user", "assistant") and isinstance(t.get("content"), str)
        for t in content)


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.stem)
def test_golden_set_schema_balance_and_declared_ids(path):
    policy = load_policy(path)
    lines = path.with_name(f"{path.stem}.golden.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    assert len(items) >= 40
    assert len({i["id"] for i in items}) == len(items), "item ids must be unique"
    positives = sum(i["violation"] for i in items)
    assert 0.35 <= positives / len(items) <= 0.65, "golden sets are balanced"
    assert {i["kind"] for i in items} == KINDS
    for item in items:
        assert {"id", "kind", "content", "violation", "category", "rule_id"} <= set(item), item["id"]
        assert item["kind"] in KINDS and _valid_content(item["kind"], item["content"]), item["id"]
        assert item["violation"] in (0, 1), item["id"]
        if item["violation"] == 0 or policy.output.format == "binary":
            assert item["category"] is None and item["rule_id"] is None, item["id"]
        else:
            assert item["category"] in policy.output.categories, item["id"]
            assert item["rule_id"] in policy.output.rule_ids, item["id"]
