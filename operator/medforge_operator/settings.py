"""Operator settings, from environment variables with command-line flags on top."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    store_endpoint: str
    store_bucket: str
    store_access_key: str = field(repr=False)
    store_secret_key: str = field(repr=False)
    # The endpoint Jobs see in presigned URLs (an in-cluster Service name, say); defaults to
    # store_endpoint.
    store_public_endpoint: str = ""
    store_region: str = "us-east-1"
    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide install)
    # Cluster-wide install: the label (key=value) that makes a namespace a MedForge member, the
    # only namespaces where the operator creates Jobs and Secrets. A namespace-scoped install
    # manages exactly its listed namespaces.
    member_label: str = "medforge.io/member=true"
    # Namespaces whose CompositeModels are reconciled (elsewhere they stall): empty, none.
    forge_namespaces: tuple[str, ...] = ()
    # Largest file the operator hashes when verifying an upload (checked before download).
    max_artifact_bytes: int = 16 << 30
    presign_expiry_seconds: int = 6 * 3600
    trainer_image: str = "ghcr.io/medforge/trainer:0.1.0"
    merger_image: str = "ghcr.io/medforge/merger:0.1.0"
    trainer_command: tuple[str, ...] = ("medforge-train",)
    merger_command: tuple[str, ...] = ("medforge-merge",)
    # Runs in the trainer's image, in a hospital's namespace (EvaluationSet).
    evaluator_command: tuple[str, ...] = ("medforge-evaluate",)
    concurrency: int = 32
    job_ttl_seconds: int = 7 * 24 * 3600
    metrics_port: int = 0  # 0: no Prometheus endpoint
    # Every interface in a pod (Prometheus scrapes the pod IP); 127.0.0.1 on a workstation.
    metrics_address: str = "0.0.0.0"  # noqa: S104
    health_port: int = 0  # 0: no liveness endpoint
    requeue_seconds: float = 20.0
    # Several replicas elect one leader on a Lease; only the leader reconciles.
    leader_election: bool = True
    lease_namespace: str = ""  # default: the pod's namespace, else "default"
    lease_name: str = "medforge-operator"

    @property
    def presign_endpoint(self) -> str:
        return self.store_public_endpoint or self.store_endpoint

    @property
    def member_selector(self) -> tuple[str, str]:
        key, _, value = self.member_label.partition("=")
        return key.strip(), value.strip()


ENV = {
    "store_endpoint": "MEDFORGE_STORE_ENDPOINT",
    "store_bucket": "MEDFORGE_STORE_BUCKET",
    "store_access_key": "MEDFORGE_STORE_ACCESS_KEY_ID",
    "store_secret_key": "MEDFORGE_STORE_SECRET_ACCESS_KEY",
    "store_public_endpoint": "MEDFORGE_STORE_PUBLIC_ENDPOINT",
    "store_region": "MEDFORGE_STORE_REGION",
    "namespaces": "MEDFORGE_NAMESPACES",
    "member_label": "MEDFORGE_MEMBER_LABEL",
    "forge_namespaces": "MEDFORGE_FORGE_NAMESPACES",
    "max_artifact_bytes": "MEDFORGE_MAX_ARTIFACT_BYTES",
    "leader_election": "MEDFORGE_LEADER_ELECTION",
    "lease_namespace": "MEDFORGE_LEASE_NAMESPACE",
    "lease_name": "MEDFORGE_LEASE_NAME",
    "presign_expiry_seconds": "MEDFORGE_PRESIGN_EXPIRY_SECONDS",
    "trainer_image": "MEDFORGE_TRAINER_IMAGE",
    "merger_image": "MEDFORGE_MERGER_IMAGE",
    "trainer_command": "MEDFORGE_TRAINER_COMMAND",
    "merger_command": "MEDFORGE_MERGER_COMMAND",
    "evaluator_command": "MEDFORGE_EVALUATOR_COMMAND",
    "concurrency": "MEDFORGE_CONCURRENCY",
    "job_ttl_seconds": "MEDFORGE_JOB_TTL_SECONDS",
    "metrics_port": "MEDFORGE_METRICS_PORT",
    "metrics_address": "MEDFORGE_METRICS_ADDRESS",
    "health_port": "MEDFORGE_HEALTH_PORT",
}
# The store's keys may be left out together: boto3's default chain then finds the pod's
# identity (IRSA or EKS Pod Identity web-identity tokens, an instance profile, a shared file).
REQUIRED = ("store_endpoint", "store_bucket")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medforge-operator",
        description="MedForge operator. Every flag can also be set by the environment variable "
        "named in its help.",
    )
    for name, env in ENV.items():
        if name in ("store_access_key", "store_secret_key"):
            continue  # credentials come from the environment only, never from argv
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=f"(env {env})")
    return p


def _command(value: str, what: str) -> tuple[str, ...]:
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{what}: not a JSON list ({exc})") from exc
        if not (isinstance(parsed, list) and parsed and all(isinstance(a, str) for a in parsed)):
            raise SettingsError(f"{what}: expected a non-empty JSON list of strings")
        return tuple(parsed)
    return tuple(value.split())


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    args = vars(parser().parse_args(argv))
    raw: dict[str, str] = {}
    for name, var in ENV.items():
        value = args.get(name) or env.get(var)
        if value:
            raw[name] = value
    # Plain AWS variables are accepted for the store credentials too.
    raw.setdefault("store_access_key", env.get("AWS_ACCESS_KEY_ID", ""))
    raw.setdefault("store_secret_key", env.get("AWS_SECRET_ACCESS_KEY", ""))
    missing = [ENV[k] for k in REQUIRED if not raw.get(k)]
    if bool(raw.get("store_access_key")) != bool(raw.get("store_secret_key")):
        missing.append(
            "MEDFORGE_STORE_SECRET_ACCESS_KEY"
            if raw.get("store_access_key")
            else "MEDFORGE_STORE_ACCESS_KEY_ID"
        )
    if missing:
        raise SettingsError(
            f"missing settings: {', '.join(missing)} (set them in the "
            "environment; the Helm chart does)"
        )
    s = Settings(**{name: _typed(name, value) for name, value in raw.items()})  # type: ignore[arg-type]
    _check(s)
    return s


def _typed(name: str, value: str) -> object:
    """One setting from its text, or SettingsError naming its variable."""
    what = ENV[name]
    if name in ("namespaces", "forge_namespaces"):
        return tuple(n.strip() for n in value.split(",") if n.strip())
    if name in ("trainer_command", "merger_command", "evaluator_command"):
        return _command(value, what)
    if name == "leader_election":
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise SettingsError(f"{what}: {value!r} is not true or false")
        return value.lower() in ("true", "1", "yes")
    if name in INTEGERS:
        try:
            return int(value)
        except ValueError as exc:
            raise SettingsError(f"{what}: {value!r} is not an integer") from exc
    return value


INTEGERS = (
    "presign_expiry_seconds",
    "concurrency",
    "job_ttl_seconds",
    "metrics_port",
    "health_port",
    "max_artifact_bytes",
)


def _check(s: Settings) -> None:
    """The rules between settings, each naming its variable."""
    if not 60 <= s.presign_expiry_seconds <= 7 * 24 * 3600:
        raise SettingsError(
            "MEDFORGE_PRESIGN_EXPIRY_SECONDS: must be between 60 and 604800 (SigV4's limit)"
        )
    key, eq, value = s.member_label.partition("=")
    if not (key.strip() and eq and value.strip()):
        raise SettingsError(
            f"MEDFORGE_MEMBER_LABEL: {s.member_label!r} is not key=value "
            "(for example medforge.io/member=true)"
        )
    if s.namespaces and (stray := sorted(set(s.forge_namespaces) - set(s.namespaces))):
        raise SettingsError(
            f"MEDFORGE_FORGE_NAMESPACES: {', '.join(stray)} not among MEDFORGE_NAMESPACES; "
            "a namespace-scoped install watches only its listed namespaces"
        )
    if s.concurrency < 1:
        raise SettingsError("MEDFORGE_CONCURRENCY: must be at least 1")
