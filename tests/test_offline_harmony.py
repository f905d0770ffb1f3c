"""Harmony renders a conversation with no network at all: the vocabulary is rebuilt locally, nothing is downloaded.

The check runs in a child process inside a fresh network namespace (`unshare -n`, which has no interfaces), with an
empty cache directory, so the vocabulary has to be rebuilt from the quicktok wheel there and then.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from classification import vocab

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, socket, sys
from pathlib import Path

from openai_harmony import Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent

from classification.vocab import load_harmony_encoding

try:
    socket.create_connection(("1.1.1.1", 443), timeout=2).close()
    network = "reachable"
except OSError as exc:
    network = f"unreachable: {exc}"

encoding = load_harmony_encoding(cache_dir=Path(sys.argv[1]))
system = SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW).with_conversation_start_date("2026-01-01")
developer = DeveloperContent.new().with_instructions("# Spam policy\\n\\nAnswer 1 if the content is spam, else 0.")
convo = Conversation.from_messages(
    [
        Message.from_role_and_content(Role.SYSTEM, system),
        Message.from_role_and_content(Role.DEVELOPER, developer),
        Message.from_role_and_content(Role.USER, "Buy cheap watches now!!!"),
    ]
)
tokens = encoding.render_conversation_for_completion(convo, Role.ASSISTANT)
print(json.dumps({"network": network, "tokens": tokens}))
"""


def unshare_network_or_skip() -> None:
    try:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot create a network namespace: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: unshare -n exited {probe.returncode}: {probe.stderr.strip()}")


def child_environment(tmpdir: Path) -> dict[str, str]:
    # Nothing inherited may point harmony at an existing vocabulary or cache.
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TIKTOKEN_") and key not in {vocab.CACHE_ENV, "TMPDIR"}
    }
    return {**inherited, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}


def test_harmony_renders_offline_from_a_fresh_cache(tmp_path: Path) -> None:
    unshare_network_or_skip()
    cache_dir = tmp_path / "cache"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    child = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", CHILD, str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=child_environment(tmpdir),
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["network"].startswith("unreachable"), "the child process could reach the network"
    tokens = result["tokens"]
    assert tokens[:3] == [200006, 17360, 200008]  # <|start|>system<|message|>
    assert tokens[-2:] == [200006, 173781]  # <|start|>assistant
    rebuilt = vocab.vocab_dir(cache_dir) / vocab.O200K_FILE_NAME
    assert hashlib.sha256(rebuilt.read_bytes()).hexdigest() == vocab.O200K_SHA256
    assert not (tmpdir / "tiktoken-rs-cache").exists(), "harmony prepared a download cache"
