"""`appliance classify`: classify content from the command line through a running appliance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import grpc
from google.protobuf.json_format import MessageToDict

from classification.errors import ApplianceError
from server.client import ContentLike, SafeguardClient


def _content(text: str | None, prompt: str | None, response: str | None, conversation: Path | None) -> ContentLike:
    given = [name for name, value in (("--text", text), ("--prompt/--response", prompt or response),
                                      ("--conversation", conversation)) if value]
    if len(given) != 1:
        raise ApplianceError("give exactly one of --text (or - for stdin), --prompt with --response, "
                             "or --conversation FILE")
    if text is not None:
        return sys.stdin.read() if text == "-" else text
    if conversation is not None:
        try:
            turns = json.loads(conversation.read_text())
            return [(t["role"], t["content"]) for t in turns]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ApplianceError(f"{conversation}: expected a JSON list of {{role, content}} turns ({exc})") from None
    if not (prompt and response):
        raise ApplianceError("--prompt and --response go together")
    return (prompt, response)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(MessageToDict(result, preserving_proto_field_name=True), indent=2))
        return
    verdict = result.verdict
    label = "n/a" if not verdict.HasField("violation") else ("VIOLATION" if verdict.violation else "no violation")
    status = MessageToDict(verdict, preserving_proto_field_name=True).get("parse_status", "")
    click.echo(f"{label}  category={verdict.category or '-'} rules={','.join(verdict.rule_ids) or '-'} "
               f"confidence={verdict.confidence or '-'}  [{status}]")
    if verdict.detail:
        click.echo(f"  detail: {verdict.detail}")
    if verdict.rationale:
        click.echo(f"  rationale: {verdict.rationale}")
    if result.reasoning:
        click.echo(f"  reasoning: {result.reasoning}")
    usage, timings = result.usage, result.timings
    click.echo(f"  policy {result.policy.id}@{result.policy.version} ({result.policy.sha256[:12]}); "
               f"prompt {usage.prompt_tokens} tokens ({usage.cached_prompt_tokens} cached), "
               f"{usage.output_tokens} generated; first token {timings.time_to_first_token_ms:.0f} ms, "
               f"total {timings.total_ms:.0f} ms")


@click.command("classify")
@click.option("--target", default="127.0.0.1:50151", help="The appliance's gRPC address.")
@click.option("--policy", required=True, help="Policy id, id@version, or a policy file (@path/to/file.md).")
@click.option("--text", help="Text to classify; - reads standard input.")
@click.option("--prompt", help="A prompt, with --response: classify the pair.")
@click.option("--response", help="The model's response to --prompt.")
@click.option("--conversation", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSON list of {role, content} turns.")
@click.option("--effort", type=click.Choice(["low", "medium", "high"]), default=None,
              help="Reasoning effort [default: the policy's].")
@click.option("--reasoning", is_flag=True, help="Also print the model's reasoning.")
@click.option("--stream", is_flag=True, help="Print the reasoning as it is produced.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole response as JSON.")
@click.option("--timeout", type=float, default=120.0, help="Seconds to wait for the verdict.")
@click.option("--tls-ca", envvar="APPLIANCE_TLS_CA", show_envvar=True, type=click.Path(dir_okay=False),
              help="PEM CA certificate that signed the server's certificate: connect over TLS.")
@click.option("--tls-cert", envvar="APPLIANCE_TLS_CERT", show_envvar=True, type=click.Path(dir_okay=False),
              help="PEM client certificate for mutual TLS (with --tls-key).")
@click.option("--tls-key", envvar="APPLIANCE_TLS_KEY", show_envvar=True, type=click.Path(dir_okay=False),
              help="PEM private key of --tls-cert.")
@click.option("--api-key", envvar="APPLIANCE_API_KEY", show_envvar=True, default=None,
              help="The API key to present (from `appliance keys create`), when the appliance requires one.")
def classify_command(target: str, policy: str, text: str | None, prompt: str | None, response: str | None,
                     conversation: Path | None, effort: str | None, reasoning: bool, stream: bool, as_json: bool,
                     timeout: float, tls_ca: str | None, tls_cert: str | None, tls_key: str | None,
                     api_key: str | None) -> None:
    """Classify one text, prompt/response pair or conversation against a policy."""
    content = _content(text, prompt, response, conversation)
    if policy.startswith("@"):
        policy = Path(policy[1:]).read_text()
    with SafeguardClient(target, timeout=timeout, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                         api_key=api_key) as client:
        try:
            if stream:
                result = None
                for event in client.classify_stream(policy, content, effort=effort, include_reasoning=reasoning):
                    if event.HasField("reasoning"):
                        click.echo(event.reasoning.text, nl=False)
                    else:
                        result = event.result
                click.echo()
            else:
                result = client.classify(policy, content, effort=effort, include_reasoning=reasoning)
        except grpc.RpcError as exc:
            raise ApplianceError(f"{exc.code().name}: {exc.details()}") from None
    if result is not None:
        _print_result(result, as_json)
