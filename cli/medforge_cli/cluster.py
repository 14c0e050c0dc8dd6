"""Reading MedForge objects through any kubeconfig, with failures as one clear line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from medforge_cli.errors import CliError

GROUP, VERSION = "medforge.io", "v1alpha1"
PLURALS = {
    "contribution": "loracontributions",
    "composite": "compositemodels",
    "basemodel": "basemodels",
    "institution": "institutions",
}
CLUSTER_SCOPED = ("basemodel", "institution")
JSON = dict[str, Any]
TIMEOUT = 30


@contextlib.contextmanager
def _api_errors(what: str) -> Iterator[None]:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        if exc.status == 404:
            raise CliError(f"{what}: not found") from None
        if exc.status in (401, 403):
            raise CliError(
                f"{what}: your kubeconfig's user may not do this ({exc.status} {exc.reason}); "
                "ask for the medforge-viewer or medforge-contributor role in that namespace"
            ) from None
        raise CliError(f"{what}: the API server answered {exc.status} {exc.reason}") from None
    except (HTTPError, OSError) as exc:
        raise CliError(
            f"{what}: cannot reach the API server ({type(exc).__name__}: {exc})"
        ) from None


@dataclass
class Cluster:
    """The API through one kubeconfig and context."""

    custom: Any
    core: Any
    batch: Any
    default_namespace: str

    @classmethod
    def connect(cls, kubeconfig: str | None, context: str | None) -> Cluster:
        from kubernetes import client, config

        try:
            config.load_kube_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError, TypeError) as exc:
            raise CliError(
                f"no usable kubeconfig ({exc}); pass --kubeconfig or set KUBECONFIG", code=2
            ) from None
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        namespace = str((chosen or {}).get("context", {}).get("namespace") or "default")
        api = client.ApiClient()
        return cls(
            client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api), namespace
        )

    def get(self, kind: str, namespace: str, name: str) -> JSON:
        plural = PLURALS[kind]
        where = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
        with _api_errors(where):
            if kind in CLUSTER_SCOPED:
                obj = self.custom.get_cluster_custom_object(
                    GROUP, VERSION, plural, name, _request_timeout=TIMEOUT
                )
            else:
                obj = self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, name, _request_timeout=TIMEOUT
                )
        return cast(JSON, obj)

    def objects(self, kind: str, namespace: str | None) -> list[JSON]:
        """Objects of `kind` in `namespace`, or in every namespace the user may list (all at
        once when allowed cluster-wide, else the context's namespace)."""
        from kubernetes.client.exceptions import ApiException

        plural = PLURALS[kind]
        if namespace is None and kind not in CLUSTER_SCOPED:
            try:
                resp = self.custom.list_cluster_custom_object(
                    GROUP, VERSION, plural, _request_timeout=TIMEOUT
                )
                return cast(list[JSON], resp["items"])
            except ApiException as exc:
                if exc.status != 403:
                    with _api_errors(f"listing {plural}"):
                        raise
                namespace = self.default_namespace
        with _api_errors(f"listing {plural}" + (f" in {namespace}" if namespace else "")):
            if kind in CLUSTER_SCOPED:
                resp = self.custom.list_cluster_custom_object(
                    GROUP, VERSION, plural, _request_timeout=TIMEOUT
                )
            else:
                resp = self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, _request_timeout=TIMEOUT
                )
        return cast(list[JSON], resp["items"])

    def job_logs(self, namespace: str, job: str, tail: int | None) -> list[tuple[str, str]]:
        """(pod name, log) of every pod of a Job, oldest first."""
        with _api_errors(f"pods of Job {namespace}/{job}"):
            pods = self.core.list_namespaced_pod(
                namespace, label_selector=f"job-name={job}", _request_timeout=TIMEOUT
            ).items
        pods.sort(key=lambda p: p.metadata.creation_timestamp)
        out = []
        for p in pods:
            with _api_errors(f"log of pod {namespace}/{p.metadata.name}"):
                text = self.core.read_namespaced_pod_log(
                    p.metadata.name, namespace, tail_lines=tail, _request_timeout=TIMEOUT
                )
            out.append((p.metadata.name, str(text)))
        return out

    def apply_basemodel(self, doc: JSON) -> None:
        """Create the BaseModel, or point an existing one at the new files (a new generation:
        the operator verifies it again)."""
        from kubernetes.client.exceptions import ApiException

        name = doc["metadata"]["name"]
        with _api_errors(f"basemodel {name}"):
            try:
                self.custom.create_cluster_custom_object(
                    GROUP, VERSION, "basemodels", doc, _request_timeout=TIMEOUT
                )
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self.custom.patch_cluster_custom_object(
                    GROUP,
                    VERSION,
                    "basemodels",
                    name,
                    {"spec": doc["spec"]},
                    _request_timeout=TIMEOUT,
                )
