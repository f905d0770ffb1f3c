"""Front-end settings: one dataclass, the single place every serving knob is declared.

Each field has a default and a `help` string in its metadata, so a command can generate its flags (and their
environment-variable twins) from `fields(ServerSettings)` without restating them; `SETTING_HELP` exposes the same
text. A field whose environment variable other commands share names it in its metadata (`envvar`): the state
directory, which `appliance policy` and `appliance audit` read too. Tuple fields are repeatable flags. `validate`
lists every problem at once, like the other settings files.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from classification.errors import ApplianceError
from server import state


class ServerSettingsError(ApplianceError):
    """Settings the front end cannot start with."""


def _setting(default: Any, help_text: str, envvar: str | None = None) -> Any:
    metadata = {"help": help_text} if envvar is None else {"help": help_text, "envvar": envvar}
    if isinstance(default, tuple | list):
        return field(default=tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerSettings:
    # -- network -----------------------------------------------------------------------------------------------
    listen: str = _setting("127.0.0.1:50151", "host:port the gRPC API listens on")
    triton_endpoints: tuple[str, ...] = _setting(
        ("127.0.0.1:8001",), "Triton gRPC endpoints (host:port), each serving the same model; repeat for several")
    triton_model: str = _setting("safeguard", "name of the Triton model to call")
    metrics_address: str = _setting("127.0.0.1", "address the Prometheus /metrics HTTP server binds to")
    metrics_port: int = _setting(50152, "port of the Prometheus /metrics HTTP server (0: any free port)")

    # -- transport security (docs/deploy.md, TLS) ---------------------------------------------------------------
    tls_cert: str = _setting("", "PEM certificate chain the gRPC API and /metrics serve over TLS; re-read when the "
                                 "file changes, so a renewed certificate applies to new connections without a "
                                 "restart")
    tls_key: str = _setting("", "PEM private key of tls_cert (unencrypted; keep it mode 0600)")
    tls_client_ca: str = _setting("", "PEM CA certificates for mutual TLS: set, every gRPC client must present a "
                                      "certificate signed by one of them")
    client_cert_map: str = _setting("", "TOML file mapping client-certificate subjects to a tenant and scopes "
                                        "(mutual TLS as an identity; needs tls_client_ca)")
    allow_insecure_listen: bool = _setting(False, "allow listen or metrics_address on a non-loopback address "
                                                  "without TLS (plaintext: anyone on the path can read and forge "
                                                  "the traffic)")

    # -- state ---------------------------------------------------------------------------------------------------
    state_dir: str = _setting(state.DEFAULT_STATE_DIR, state.STATE_DIR_HELP, envvar=state.STATE_DIR_ENV)
    audit_store_rationale: bool = _setting(True, "keep the model's rationale in the audit log")
    audit_store_content: bool = _setting(False, "keep the classified content itself in the audit log "
                                                "(its sha256 is always kept)")
    audit_wait: bool = _setting(False, "answer only once the decision's audit record is on disk (adds an fsync, "
                                       "milliseconds, to every answer); off, the record is queued before the "
                                       "answer and a crash can lose the last few milliseconds of records")

    # -- model -----------------------------------------------------------------------------------------------------
    model_repository: str = _setting(
        "", "the Triton model repository, when it is on this host: its engine.json names the model when the "
            "Triton model config has no 'model_fingerprint' parameter")
    model_fingerprint: str = _setting(
        "", "fingerprint of the served model (cache keys, audit records), used only when neither the Triton model "
            "config nor model_repository names it")
    model_dir: str = _setting("", "checkpoint directory whose tokenizer.json provides the vocabulary; empty: the "
                                  "vocabulary bundled with the quicktok-v1 package")
    max_output_tokens: int = _setting(1024, "generation budget of one classification (reasoning included)")
    prefix_priority: int = _setting(90, "0..100 cache-retention priority sent with policy prefixes (and their "
                                        "warm-up); TensorRT-LLM's default for other blocks is 35")

    # -- limits ------------------------------------------------------------------------------------------------------
    max_content_tokens: int = _setting(16_384, "largest content (the user message) accepted, in tokens")
    max_policy_tokens: int = _setting(10_000, "largest policy body accepted, in tokens")
    max_batch_items: int = _setting(256, "most items one ClassifyBatch may carry")
    max_in_flight: int = _setting(64, "prompts being classified at once; past it requests are refused with "
                                      "RESOURCE_EXHAUSTED and a retry hint")
    batch_concurrency: int = _setting(8, "prompts one ClassifyBatch runs at once (each takes an in-flight slot)")
    default_timeout_s: float = _setting(120.0, "deadline of a request whose client sets none, in seconds")

    # -- bounded work: what a request costs, and what one caller may take (server/batch_plan.py, limits.py,
    #    rate_limit.py, warmup.py) -------------------------------------------------------------------------------
    max_batch_prompts: int = _setting(1024, "most prompts one ClassifyBatch may fan out to: each item once per "
                                            "distinct policy it is classified against, duplicates collapsed")
    max_batch_policies: int = _setting(16, "most distinct policies one ClassifyBatch may name (shared and per-item "
                                           "together)")
    max_item_policies: int = _setting(8, "most distinct policies one batch item may be classified against")
    batch_timeout_s: float = _setting(300.0, "overall deadline of a ClassifyBatch, in seconds (a sooner client "
                                             "deadline wins): items unfinished by then answer DEADLINE_EXCEEDED and "
                                             "the stream ends cleanly")
    tenant_in_flight_share: float = _setting(
        0.75, "share of max_in_flight one tenant may hold, so other tenants still get in; the anonymous caller "
              "(authentication off, when every request is the default tenant's) is exempt: it is then the only "
              "tenant, and a share would only leave slots idle")
    batch_in_flight_share: float = _setting(
        0.75, "share of max_in_flight one tenant's batches may hold together (the anonymous caller included), so "
              "single requests still get in beside bulk work; a batch past it runs with fewer slots, down to one")
    tenant_rate: float = _setting(0.0, "classification requests a second one tenant may send (a batch counts "
                                       "once); past it RESOURCE_EXHAUSTED with a retry hint. With authentication "
                                       "off all callers share the default tenant's. 0: no limit")
    tenant_burst: int = _setting(20, "requests a tenant may send at once above tenant_rate (its bucket's size)")
    warm_interval_s: float = _setting(0.2, "least seconds between the starts of two policy prefix warm-ups while "
                                           "serving (at start they run back to back); they run one at a time and "
                                           "coalesce per policy, and an activation answers once its warm-up ran, so "
                                           "activating policies in a loop cannot crowd classification out")

    # -- input bounds and content clean-up (issue G, items 4 and 5) -------------------------------------------
    metrics_policy_labels: int = _setting(64, "policy ids that get a metrics label of their own (the first seen "
                                              "that resolve in the registry); further ids are counted as 'other'")
    normalise_content: bool = _setting(False, "before classification, apply Unicode NFKC and remove zero-width "
                                              "and bidi-control characters from all content (a policy can ask "
                                              "for it alone with normalise_input = true); the audit record "
                                              "keeps the hash of the content as received")

    # -- authentication (server/auth.py, server/keys.py) ---------------------------------------------------------------
    auth: str = _setting("auto", "who may call: auto (require a credential once any API key exists or client "
                                 "certificates are mapped), on (always require one), off (everyone is the default "
                                 "tenant with every scope)")
    key_refresh_s: float = _setting(5.0, "seconds between re-reads of the API key table: a key revoked with "
                                         "`appliance keys revoke` stops working within this time")
    admin_listen: str = _setting("", "host:port of a second listener that alone serves the policy changes "
                                     "(PutPolicy, ActivatePolicy, RollbackPolicy); empty: the main listener serves "
                                     "them")
    allow_unauthenticated: bool = _setting(False, "serve without authentication on a non-loopback address "
                                                  "(anyone who reaches the port could then change policies)")

    # -- housekeeping -----------------------------------------------------------------------------------------
    health_interval_s: float = _setting(0.5, "seconds between readiness probes of each Triton endpoint")
    policy_refresh_s: float = _setting(2.0, "seconds between checks for policy activations made by other "
                                            "processes (the CLI)")
    grace_s: float = _setting(10.0, "seconds running requests get to finish at shutdown")
    log_level: str = _setting("info", "log level: debug, info, warning or error")

    @property
    def state_path(self) -> Path:
        return state.state_path(self.state_dir)

    @property
    def audit_path(self) -> Path:
        return state.audit_path(self.state_dir)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServerSettings:
        """Settings from plain values (a command's options, JSON): lists become tuples; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ServerSettingsError(f"unknown settings: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def validate(self) -> ServerSettings:
        """Raise ServerSettingsError listing every problem; returns self so calls chain."""
        problems = [f"{name}: {problem}" for name, problem in _problems(self)]
        if problems:
            raise ServerSettingsError(problems)
        return self


SETTING_HELP: dict[str, str] = {f.name: f.metadata["help"] for f in fields(ServerSettings)}


def _address_problem(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"{value!r} is not host:port"
    return None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses; any other name may resolve to anything, so it is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def _transport_problems(s: ServerSettings) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if bool(s.tls_cert) != bool(s.tls_key):
        found.append(("tls_key" if s.tls_cert else "tls_cert", "tls_cert and tls_key go together: set both"))
    if s.tls_client_ca and not s.tls_cert:
        found.append(("tls_client_ca", "mutual TLS needs TLS: set tls_cert and tls_key too"))
    if s.client_cert_map and not s.tls_client_ca:
        found.append(("client_cert_map", "client certificates are only asked for under mutual TLS: set "
                                         "tls_client_ca too"))
    if s.tls_cert or s.allow_insecure_listen:
        return found
    host = s.listen.rpartition(":")[0]
    if _address_problem(s.listen) is None and not is_loopback(host):
        found.append(("listen", f"{host} is not a loopback address and TLS is off: anyone who can reach it could "
                                "read the content and forge requests. Set tls_cert and tls_key, or listen on "
                                "127.0.0.1 behind a TLS-terminating proxy, or (on a network you trust) set "
                                "allow_insecure_listen"))
    if not is_loopback(s.metrics_address):
        found.append(("metrics_address", f"{s.metrics_address} is not a loopback address and TLS is off: set "
                                         "tls_cert and tls_key (metrics are then served over HTTPS), keep metrics "
                                         "on 127.0.0.1, or set allow_insecure_listen"))
    return found


def _problems(s: ServerSettings) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    addresses = [("listen", s.listen), *((f"triton_endpoints[{i}]", e) for i, e in enumerate(s.triton_endpoints))]
    for name, value in addresses:
        if (problem := _address_problem(value)) is not None:
            found.append((name, problem))
    if not s.triton_endpoints:
        found.append(("triton_endpoints", "name at least one Triton endpoint"))
    if len(set(s.triton_endpoints)) != len(s.triton_endpoints):
        found.append(("triton_endpoints", "an endpoint is listed twice"))
    if not 0 <= s.metrics_port <= 65535:
        found.append(("metrics_port", f"{s.metrics_port} is not a port number"))
    if not 0 <= s.prefix_priority <= 100:
        found.append(("prefix_priority", f"must be within 0..100, got {s.prefix_priority}"))
    for name in ("max_output_tokens", "max_content_tokens", "max_policy_tokens", "max_batch_items",
                 "max_in_flight", "batch_concurrency"):
        if getattr(s, name) < 1:
            found.append((name, f"must be at least 1, got {getattr(s, name)}"))
    if s.metrics_policy_labels < 0:
        found.append(("metrics_policy_labels", f"must be 0 or more, got {s.metrics_policy_labels}"))
    for name in ("default_timeout_s", "health_interval_s", "policy_refresh_s"):
        if not getattr(s, name) > 0:
            found.append((name, f"must be more than 0, got {getattr(s, name)}"))
    for name in ("max_batch_prompts", "max_batch_policies", "max_item_policies", "tenant_burst"):
        if getattr(s, name) < 1:
            found.append((name, f"must be at least 1, got {getattr(s, name)}"))
    for name in ("tenant_in_flight_share", "batch_in_flight_share"):
        if not 0 < getattr(s, name) <= 1:
            found.append((name, f"must be more than 0 and at most 1, got {getattr(s, name)}"))
    if not s.batch_timeout_s > 0:
        found.append(("batch_timeout_s", f"must be more than 0, got {s.batch_timeout_s}"))
    for name in ("tenant_rate", "warm_interval_s"):
        if getattr(s, name) < 0:
            found.append((name, f"must be 0 or more, got {getattr(s, name)}"))
    if s.grace_s < 0:
        found.append(("grace_s", f"must be 0 or more, got {s.grace_s}"))
    found += _auth_problems(s)
    if s.log_level not in ("debug", "info", "warning", "error"):
        found.append(("log_level", f"must be debug, info, warning or error, got {s.log_level!r}"))
    found.extend(_transport_problems(s))
    return found


def exposed_addresses(s: ServerSettings) -> list[str]:
    """The listen addresses other hosts could reach."""
    return [a for a in (s.listen, s.admin_listen) if a and not is_loopback(a.rpartition(":")[0])]


def _auth_problems(s: ServerSettings) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if s.auth not in ("auto", "on", "off"):
        found.append(("auth", f"must be auto, on or off, got {s.auth!r}"))
    if not s.key_refresh_s > 0:
        found.append(("key_refresh_s", f"must be more than 0, got {s.key_refresh_s}"))
    if s.admin_listen:
        if (problem := _address_problem(s.admin_listen)) is not None:
            found.append(("admin_listen", problem))
        elif s.admin_listen == s.listen and not s.listen.endswith(":0"):  # port 0: each gets its own
            found.append(("admin_listen", "must differ from listen"))
        elif not (s.tls_cert or s.allow_insecure_listen or is_loopback(s.admin_listen.rpartition(":")[0])):
            found.append(("admin_listen", f"{s.admin_listen} is not a loopback address and TLS is off: set tls_cert "
                                          "and tls_key, or allow_insecure_listen"))
    exposed = exposed_addresses(s)
    if s.auth == "off" and exposed and not s.allow_unauthenticated:
        found.append(("auth", f"is off, but {' and '.join(exposed)} can be reached from other hosts, so anyone "
                              "there could classify and change policies; turn auth on (and create keys with "
                              "`appliance keys create`), listen on 127.0.0.1, or set allow_unauthenticated"))
    return found
