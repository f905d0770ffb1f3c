"""`appliance quickstart`: the main job on a CPU, end to end over what exists so far.

It synthesizes the smoke checkpoint (a tiny gpt-oss with the real vocabulary and layout, cached after the first
run), checks it like any checkpoint, loads the harmony tokenizer offline from it, renders classification prompts for
a bundled policy, generates with transformers on the CPU and parses the completion into a verdict. The smoke weights
are random here, so the verdicts are parse failures by design: this is a fixture and a demo, not a classifier.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from engine.checkpoint import check_checkpoint, format_report
from engine.harmony_parse import parse_completion
from engine.prompt import STOP_TOKEN_IDS, Chat, PromptRenderer, PromptResponse, Text, Turn
from engine.vocab import default_cache_dir, load_harmony_encoding
from server.policy import load_policy
from server.verdict import parse_verdict

POLICY_FILE = Path(__file__).resolve().parents[1] / "policies" / "spam-scams.md"
EXAMPLES = (
    Text("CONGRATULATIONS!!! You won a $1,000 gift card. Claim now at http://prize.example.com before midnight!"),
    PromptResponse("Can you recommend a budgeting app?", "Many people like spreadsheet templates; your bank's own "
                   "app may also have budgeting tools."),
    Chat((Turn("user", "Is this message legit? 'Your parcel is held, pay a $2 fee at parcel-help.example.net'"),
          Turn("assistant", "That looks like a delivery scam; don't pay or click the link."))),
)


def smoke_model_dir(cache_dir: Path) -> Path:
    """The synthetic smoke checkpoint, written once into the cache."""
    from engine.synth import synthesize

    target = cache_dir / "models" / "smoke-seed0"
    if not (target / "config.json").is_file():
        partial = target.with_name(target.name + ".partial")
        synthesize("smoke", partial, seed=0)
        partial.rename(target)
    return target


@click.command("quickstart")
@click.option("--max-tokens", type=click.IntRange(1, 512), default=48, help="Generation budget per example.")
def quickstart_command(max_tokens: int) -> None:
    """Synthesize the smoke model, check it, render prompts and classify examples on this CPU."""
    started = time.perf_counter()
    model_dir = smoke_model_dir(default_cache_dir())
    report = check_checkpoint(model_dir, for_serving=True)
    click.echo(format_report(report))
    if not report.ok:
        raise click.ClickException("the smoke checkpoint failed its checks")

    encoding = load_harmony_encoding(model_dir)
    policy = load_policy(POLICY_FILE)
    renderer = PromptRenderer(encoding, model_fingerprint=f"smoke:{report.disk_bytes}")
    prefix = renderer.prefix(policy.body, policy.reasoning_effort)
    click.echo(f"\npolicy {policy.id} {policy.version} (sha256 {policy.sha256[:12]}): prefix {len(prefix.ids)} "
               f"tokens, cache key {prefix.key[:16]}")

    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
    click.echo("model: smoke preset, random weights (a fixture, not a classifier); transformers on the CPU\n")
    for content in EXAMPLES:
        prompt = renderer.render(prefix, content)
        t0 = time.perf_counter()
        out = model.generate(torch.tensor([prompt.ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=list(STOP_TOKEN_IDS), pad_token_id=199999)
        completion = out[0, len(prompt.ids):].tolist()
        finish = "stop" if completion and completion[-1] in STOP_TOKEN_IDS else "length"
        verdict = parse_verdict(parse_completion(completion, encoding.decode), policy.output, finish)
        click.echo(f"{type(content).__name__:<15} prompt {len(prompt.ids)} tokens (prefix {prompt.prefix_len}), "
                   f"{len(completion)} generated in {time.perf_counter() - t0:.2f} s, finish {finish}")
        click.echo(f"  verdict: status {verdict.status}, violation {verdict.violation}  ({verdict.detail})")
    click.echo(f"\ndone in {time.perf_counter() - started:.1f} s")
