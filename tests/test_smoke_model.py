"""The trained smoke model, a fixture and demo, not a classifier: on the smoke policy's held-out golden items it
answers in well-formed harmony and its verdicts follow the policy's rule.

The checkpoint is trained once per source version (a minute or two on 2 cores) and cached under the git-ignored
`.cache/` (tests/conftest.py points APPLIANCE_CACHE_DIR there); every test here reads that one copy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from classification.content import serialise
from classification.policy import load_policy
from classification.vocab import load_harmony_encoding
from engine.checkpoint import smoke
from engine.checkpoint.config import preset_dict
from engine.checkpoint.safetensors_io import read_header
from engine.checkpoint.smoke import cache, data, evaluation, training
from engine.checkpoint.synth import synthesize
from engine.checkpoint.validate import check_checkpoint

pytest.importorskip("torch")
pytest.importorskip("transformers")
OK_TARGET = 0.95
RULE_TARGET = 0.90


@pytest.fixture(scope="module")
def trained() -> Path:
    return cache.ensure_trained(seed=0)


def _file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_golden_items_come_back_ok_and_follow_the_rule(trained: Path) -> None:
    result = evaluation.evaluate(trained)
    print(result.summary())
    for failure in result.failures:
        print("  " + failure)
    assert result.total >= 40
    assert result.ok_rate >= OK_TARGET, result.summary()
    assert result.rule_rate >= RULE_TARGET, result.summary()


def test_the_cached_checkpoint_has_the_published_layout(trained: Path) -> None:
    report = check_checkpoint(trained, for_serving=True)
    assert report.ok, report.problems
    assert json.loads((trained / "config.json").read_text()) == preset_dict("smoke")
    for shard in trained.glob("*.safetensors"):
        assert read_header(shard).metadata["synthetic"] == "safeguard-appliance preset=smoke seed=0 trained"


def synth(*args: str | Path) -> None:
    from appliance.cli import main

    result = CliRunner().invoke(main, ["synth", "--preset", "smoke", *map(str, args)])
    assert result.exit_code == 0, result.output


def test_appliance_synth_writes_the_trained_model_by_default(trained: Path, tmp_path: Path) -> None:
    synth("--out", tmp_path / "default")
    assert _file_digests(tmp_path / "default") == _file_digests(trained)
    one_file = synthesize("smoke", tmp_path / "one", max_shard_bytes=1 << 40, tokenizer=False,
                          weights=cache.trained_weights())
    assert one_file.shards == ["model.safetensors"]
    assert cache.weights_digest(dict(cache.read_checkpoint(one_file.out))) == \
        cache.weights_digest(dict(cache.read_checkpoint(trained)))
    synth("--out", tmp_path / "random", "--no-train")
    assert _file_digests(tmp_path / "random").keys() == _file_digests(trained).keys()
    assert _file_digests(tmp_path / "random") != _file_digests(trained)


def test_training_is_deterministic_per_seed() -> None:
    # The first steps stand in for a whole run: the same code path, at a fraction of the cost.
    short = training.TrainConfig(seed=0, steps=6, warmup=2, quantized_steps=2)
    first = cache.weights_digest(training.train(short))
    assert cache.weights_digest(training.train(short)) == first
    other = training.TrainConfig(seed=1, steps=6, warmup=2, quantized_steps=2)
    assert cache.weights_digest(training.train(other)) != first


def test_the_cache_key_covers_seed_depth_code_and_policy() -> None:
    keys = {cache.cache_key(0, None), cache.cache_key(1, None), cache.cache_key(0, 1)}
    assert len(keys) == 3
    assert cache.cached_dir(0).name.startswith("smoke-trained-seed0-")


def test_golden_items_are_held_out_of_training_and_every_label_is_the_rule() -> None:
    config = training.TrainConfig()
    stream = data.training_examples(config.seed, load_harmony_encoding())
    examples = list(itertools.islice(stream, config.steps * config.batch_size))
    golden = evaluation.golden_items()
    assert not {serialise(e.content) for e in examples} & {serialise(item.content) for item in golden}
    for item in (*examples, *golden):
        assert item.violation == data.mentions_banana(serialise(item.content)), item
    assert 0.45 <= sum(e.violation for e in examples) / len(examples) <= 0.55


def test_the_target_completion_is_harmony_that_openai_harmony_reads() -> None:
    from openai_harmony import Role

    encoding = load_harmony_encoding()
    for violation in (False, True):
        messages = encoding.parse_messages_from_completion_tokens(data.completion_ids(encoding, violation),
                                                                  Role.ASSISTANT)
        assert [m.channel for m in messages] == ["analysis", "final"]
        assert messages[1].content[0].text == data.FINAL[violation]


def test_the_policy_and_golden_set_say_what_they_are() -> None:
    policy = load_policy(data.POLICY_FILE)
    assert policy.id == "smoke"
    for text in (policy.title, policy.body, policy.notes, smoke.__doc__):
        assert "fixture and demo, not a classifier" in " ".join(text.split())
    assert len(load_harmony_encoding().encode(policy.body, disallowed_special=())) <= 300
