"""The held-out check: the smoke model, reloaded from its checkpoint as served, on the smoke policy's golden set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from classification.completion import parse_completion
from classification.golden import GoldenItem, golden_path, load_golden
from classification.policy import load_policy
from classification.render import PromptRenderer
from classification.tokens import STOP_TOKEN_IDS
from classification.verdict import OK, parse_verdict
from classification.vocab import load_harmony_encoding
from engine.checkpoint.smoke.data import DISCLAIMER, PAD, POLICY_FILE
from engine.checkpoint.smoke.training import torch_settings


@dataclass(frozen=True)
class Evaluation:
    """How the checkpoint did on the golden set."""

    total: int
    ok: int  # verdicts that parse with status ok
    follows_rule: int  # verdicts (of any status) whose violation equals the golden label
    failures: tuple[str, ...]  # one line per item that is not ok or breaks the rule, with its completion

    @property
    def ok_rate(self) -> float:
        return self.ok / self.total

    @property
    def rule_rate(self) -> float:
        return self.follows_rule / self.total

    def summary(self) -> str:
        return (f"smoke model ({DISCLAIMER}): {self.ok}/{self.total} ok ({self.ok_rate:.0%}), "
                f"{self.follows_rule}/{self.total} follow the rule ({self.rule_rate:.0%})")


def golden_items() -> list[GoldenItem]:
    """The smoke policy's golden set: held out, never trained on."""
    return load_golden(golden_path(POLICY_FILE))


def evaluate(model_dir: Path, max_new_tokens: int = 64) -> Evaluation:
    """Greedy-decode every golden item with transformers over the full vocabulary, as served, and read the verdicts.

    The model is loaded the way the CPU executor loads it (MXFP4 experts dequantized, BF16), so what is measured is
    the checkpoint on disk, after quantization.
    """
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    encoding = load_harmony_encoding(model_dir)
    policy = load_policy(POLICY_FILE)
    renderer = PromptRenderer(encoding, model_fingerprint="smoke-eval")
    prefix = renderer.prefix(policy.body, policy.reasoning_effort)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.bfloat16)
    items = golden_items()
    ok = follows = 0
    failures: list[str] = []
    with torch_settings(1), torch.no_grad():
        for item in items:
            prompt = renderer.render(prefix, item.content).ids
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=list(STOP_TOKEN_IDS), pad_token_id=PAD)
            completion = out[0, len(prompt):].tolist()
            finish = "stop" if completion and completion[-1] in STOP_TOKEN_IDS else "length"
            verdict = parse_verdict(parse_completion(completion, encoding.decode), policy.output, finish)
            ok += verdict.status == OK
            follows += verdict.violation == item.violation
            if verdict.status != OK or verdict.violation != item.violation:
                failures.append(f"{item.id}: {verdict.status}, violation {verdict.violation}, expected "
                                f"{item.violation}: {encoding.decode(completion)!r}")
    return Evaluation(len(items), ok, follows, tuple(failures))
