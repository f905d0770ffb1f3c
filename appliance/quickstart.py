"""`appliance quickstart`: the whole stack on this CPU, from nothing to real verdicts, then a clean stop.

1. the smoke checkpoint: a tiny gpt-oss with the real vocabulary and layout, trained once (cached) to answer the
   bundled smoke policy in well-formed harmony. It is a fixture and a demo, not a classifier;
2. `appliance build --gpu cpu`: a Triton model repository for the reference executor;
3. a supervised tritonserver on that repository and the gRPC front end, both on 127.0.0.1 with free ports;
4. the smoke policy registered and activated over the API (its prefix is warmed), then examples classified:
   one by one (the second request of a policy is served from the prefix cache) and as one batch;
5. everything stopped, nothing left running.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from classification.content import Content, PromptResponse, Text
from classification.golden import golden_path, load_golden
from classification.library import bundled_policy
from classification.vocab import default_cache_dir

EXAMPLE_IDS = ("smoke-001", "smoke-002", "smoke-003")  # then one of each other content kind from the golden set


@dataclass(frozen=True)
class Example:
    item_id: str
    content: object  # what server.client accepts: str, (prompt, response) or [(role, text), ...]
    expected: bool


def examples() -> list[Example]:
    items = load_golden(golden_path(bundled_policy("smoke")))
    chosen = [i for i in items if i.id in EXAMPLE_IDS]
    for kind in ("prompt_response", "conversation"):
        chosen += [i for i in items if i.kind == kind][:2]
    return [Example(i.id, _client_content(i.content), i.violation) for i in chosen]


def _client_content(content: Content):
    if isinstance(content, Text):
        return content.text
    if isinstance(content, PromptResponse):
        return (content.prompt, content.response)
    return [(t.role, t.content) for t in content.turns]


def _step(message: str) -> float:
    click.echo(click.style(f"==> {message}", bold=True))
    return time.perf_counter()


def prepare(work: Path) -> Path:
    """Synthesize (or reuse) the trained smoke model and build its CPU repository; returns the repository."""
    from build_scripts.build import BuildOptions, build
    from engine.checkpoint.smoke.cache import trained_weights
    from engine.checkpoint.synth import synthesize

    t0 = _step("smoke model (a fixture and demo, not a classifier): synthesize, trained once and cached")
    model = work / "model"
    synthesize("smoke", model, weights=trained_weights())
    click.echo(f"    {model} ready in {time.perf_counter() - t0:.1f} s")
    t0 = _step("appliance build --gpu cpu: Triton model repository for the reference executor")
    result = build(BuildOptions(target="cpu", model_dir=model, out=work / "repo", force=True))
    click.echo(f"    {result.repository} (model fingerprint {result.settings.model_fingerprint[:16]}) "
               f"in {time.perf_counter() - t0:.1f} s")
    return result.repository


def _print_result(example: Example, response, seconds: float) -> None:
    verdict = response.verdict
    got = verdict.violation if verdict.HasField("violation") else None
    mark = "matches" if got == example.expected else "differs from"
    click.echo(f"  {example.item_id:<10} violation={got!s:<5} ({mark} the label) category={verdict.category or '-'}"
               f"  prompt {response.usage.prompt_tokens} tokens, {response.usage.cached_prompt_tokens} cached,"
               f" {response.usage.output_tokens} generated, first token {response.timings.time_to_first_token_ms:.0f}"
               f" ms, total {seconds * 1000:.0f} ms")
    if response.reasoning:
        click.echo(f"             reasoning: {response.reasoning.strip()}")


async def _run(repository: Path, state: Path) -> int:
    from server.client import SafeguardClient
    from server.servicer import build_server
    from server.settings import ServerSettings
    from server.triton.supervisor import SupervisorConfig, TritonSupervisor

    t0 = _step("tritonserver (supervised) and the gRPC front end on 127.0.0.1")
    supervisor = TritonSupervisor(SupervisorConfig(repository))
    url = await asyncio.to_thread(supervisor.start)
    settings = ServerSettings(listen="127.0.0.1:0", metrics_port=0, triton_endpoints=(url,), state_dir=str(state),
                              model_repository=str(repository), max_output_tokens=96).validate()
    frontend = build_server(settings)
    mismatches = 0
    try:
        await frontend.start()
        click.echo(f"    Triton {url}, API {frontend.address}, metrics port {frontend.metrics_server.port} "
                   f"in {time.perf_counter() - t0:.1f} s")
        client = SafeguardClient(frontend.address, timeout=120)

        _step("register and activate the smoke policy (its prefix is warmed on Triton)")
        version = await asyncio.to_thread(client.put_policy, bundled_policy("smoke").read_text(), activate=True)
        click.echo(f"    {version.id}@{version.version} sha256 {version.sha256[:12]}, {version.tokens} tokens")

        _step("Classify, one request at a time")
        for example in examples():
            started = time.perf_counter()
            response = await asyncio.to_thread(client.classify, "smoke", example.content, include_reasoning=True)
            _print_result(example, response, time.perf_counter() - started)
            mismatches += (response.verdict.violation if response.verdict.HasField("violation") else None) \
                != example.expected

        _step("ClassifyBatch: the same examples at once")
        started = time.perf_counter()
        results = await asyncio.to_thread(lambda: list(client.classify_batch([e.content for e in examples()],
                                                                             ["smoke"])))
        ok = sum(1 for r in results if r.HasField("result"))
        click.echo(f"    {ok}/{len(results)} answered in {(time.perf_counter() - started) * 1000:.0f} ms")
        client.close()
    finally:
        t0 = _step("stop: drain the front end, then Triton")
        await frontend.stop(grace=5)
        await asyncio.to_thread(supervisor.stop)
        click.echo(f"    stopped in {time.perf_counter() - t0:.1f} s")
    return mismatches


@click.command("quickstart")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the model and repository go [default: <cache>/quickstart].")
def quickstart_command(work_dir: Path | None) -> None:
    """Run the whole appliance on this CPU with the smoke model and print real verdicts."""
    started = time.perf_counter()
    work = work_dir or default_cache_dir() / "quickstart"
    work.mkdir(parents=True, exist_ok=True)
    repository = prepare(work)
    with tempfile.TemporaryDirectory(prefix="safeguard-quickstart-") as state:
        mismatches = asyncio.run(_run(repository, Path(state)))
    click.echo(f"\ndone in {time.perf_counter() - started:.1f} s; {mismatches} verdict(s) differ from the labels. "
               "The smoke model is a fixture and demo, not a classifier: serve a real gpt-oss-safeguard checkpoint "
               "for real decisions (docs/build.md).")
