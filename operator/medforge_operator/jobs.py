"""Pure builders of the batch/v1 Jobs the operator creates (plain dicts, as the API takes them)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from medforge_common.manifest import digest_of
from medforge_common.redact import redact
from medforge_common.uris import S3Uri
from medforge_operator import GROUP, VERSION, names
from medforge_operator.bodies import Obj

JSON = dict[str, Any]
MANAGED_BY = "medforge-operator"
LABEL_COMPONENT = "medforge.io/component"
LABEL_OWNER = "medforge.io/owner"  # the owner's name as a label value (hashed past 63 chars)
ANNOTATION_OWNER = "medforge.io/owner-name"  # the owner's name in full, on Jobs and pods
LABEL_OWNER_NS = "medforge.io/owner-namespace"
LABEL_GENERATION = "medforge.io/generation"
LABEL_REVISION = "medforge.io/revision"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# For people reading the Job only: a member namespace is the tenant's to write, so the operator
# never reads its children's annotations back (its record of each Job is in the owner's status).
ANNOTATION_BASE_DIGEST = "medforge.io/base-model-digest"
ANNOTATION_BASE_NAME = "medforge.io/base-model"
ANNOTATION_EXPIRES = "medforge.io/urls-expire-at"
CONFIG_MOUNT = "/etc/medforge/job"
CONFIG_KEY = "config.json"


def owner_reference(obj: Obj) -> JSON:
    meta = obj["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def config_secret_name(job_name: str) -> str:
    return f"{job_name}-config"


def restricted_pod(container: JSON, resources: JSON, volumes: list[JSON]) -> JSON:
    """A pod spec that meets the `restricted` Pod Security level."""
    pod: JSON = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "scratch", "emptyDir": {}}, *volumes],
    }
    if resources.get("nodeSelector"):
        pod["nodeSelector"] = dict(resources["nodeSelector"])
    if resources.get("tolerations"):
        pod["tolerations"] = list(resources["tolerations"])
    if resources.get("priorityClassName"):
        pod["priorityClassName"] = resources["priorityClassName"]
    return pod


def container_resources(resources: JSON) -> JSON:
    limits: JSON = {}
    requests: JSON = {}
    for key in ("cpu", "memory"):
        if resources.get(key) is not None:
            limits[key] = requests[key] = str(resources[key])
    if int(resources.get("gpus") or 0) > 0:
        limits["nvidia.com/gpu"] = str(int(resources["gpus"]))
    out: JSON = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def _container(
    component: str,
    image: str,
    command: list[str],
    env: list[JSON],
    resources: JSON,
    mounts: list[JSON],
) -> JSON:
    return {
        "name": component,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(command),
        "env": [
            # The config holds presigned URLs: it lives in a Secret owned by the Job (which
            # `view` cannot read), never in env, which anyone who may view the pod reads.
            {"name": "MEDFORGE_JOB_CONFIG_FILE", "value": f"{CONFIG_MOUNT}/{CONFIG_KEY}"},
            {"name": "HOME", "value": "/scratch"},
            {"name": "TMPDIR", "value": "/scratch/tmp"},
            *env,
        ],
        "resources": container_resources(resources),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "job-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            *mounts,
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _failure_policy(component: str, verdict_exit_codes: tuple[int, ...]) -> JSON:
    """An exit that is a verdict fails the Job at once: retrying it would only repeat it."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": component,
                    "operator": "In",
                    "values": list(verdict_exit_codes),
                },
            }
        ]
    }


def job_manifest(
    *,
    name: str,
    namespace: str,
    owner: Obj,
    component: str,
    image: str,
    command: list[str],
    annotations: dict[str, str],
    env: list[JSON],
    labels: dict[str, str],
    resources: JSON,
    volumes: list[JSON],
    volume_mounts: list[JSON],
    backoff_limit: int,
    active_deadline: int | None,
    ttl_seconds: int,
    verdict_exit_codes: tuple[int, ...] = (),
) -> JSON:
    all_labels = {
        "app.kubernetes.io/name": "medforge",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_COMPONENT: component,
        LABEL_OWNER: names.label_value(owner["metadata"]["name"]),
        **labels,
    }
    container = _container(component, image, command, env, resources, volume_mounts)
    config_volume = {
        "name": "job-config",
        "secret": {"secretName": config_secret_name(name), "defaultMode": 0o440},
    }
    spec: JSON = {
        "backoffLimit": backoff_limit,
        "ttlSecondsAfterFinished": ttl_seconds,
        "template": {
            "metadata": {
                "labels": all_labels,
                "annotations": {ANNOTATION_OWNER: owner["metadata"]["name"]},
            },
            "spec": restricted_pod(container, resources, [config_volume, *volumes]),
        },
    }
    if active_deadline:
        spec["activeDeadlineSeconds"] = active_deadline
    if verdict_exit_codes:
        spec["podFailurePolicy"] = _failure_policy(component, verdict_exit_codes)
    job_labels = dict(all_labels)
    if resources.get("queueName"):
        job_labels[KUEUE_QUEUE] = resources["queueName"]
        # Kueue admits queued Jobs by unsuspending them; created suspended, none starts early.
        spec["suspend"] = True
    metadata = {
        "name": name,
        "namespace": namespace,
        "labels": job_labels,
        "annotations": {**annotations, ANNOTATION_OWNER: owner["metadata"]["name"]},
        "ownerReferences": [owner_reference(owner)],
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def get_ref(uri: S3Uri) -> JSON:
    """A file the Job will read, in a plan: signed into a GET URL when the config is written."""
    return {"get": str(uri)}


def put_ref(uri: S3Uri) -> JSON:
    """A file the Job will write, in a plan: signed into a PUT URL when the config is written."""
    return {"put": str(uri)}


def plan_digest(plan: Mapping[str, Any]) -> str:
    """A plan's identity, recorded in the owner's status when its Job is created: a queued Job
    whose plan would differ now is replaced before it starts."""
    raw = json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()
    return digest_of(raw)


MAX_URL_LIFETIME = 7 * 24 * 3600  # SigV4's limit
URL_SLACK = 600  # URLs outlive the Job's deadline by this much (clock skew, a slow upload)


def capped_lifetime(job: JSON, lifetime: int, now: float) -> int:
    """The URL lifetime the spec and settings give, capped by what is left of the Job's own
    deadline (activeDeadlineSeconds from its start): a value read from the Job can only
    shorten it."""
    spec = job.get("spec") or {}
    deadline = spec.get("activeDeadlineSeconds")
    out = min(int(lifetime), MAX_URL_LIFETIME)
    if isinstance(deadline, int) and not isinstance(deadline, bool) and deadline > 0:
        left = deadline + URL_SLACK
        started = parse_time((job.get("status") or {}).get("startTime"))
        if started is not None:
            left = int(started + deadline + URL_SLACK - now)
        out = min(out, left)
    return max(60, out)


def parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


MAX_CONFIG_BYTES = 900_000  # a Secret holds at most 1 MiB; room for its metadata


def secret_size(secret: JSON) -> int:
    return sum(len(v.encode()) for v in (secret.get("stringData") or {}).values())


def config_secret(job: JSON, config: JSON, expires_at: str) -> JSON:
    """The Secret that carries a Job's config, owned by the Job (deleted with it)."""
    meta = job["metadata"]
    # The operator's own labels, never copied from the Job (which the tenant may relabel).
    labels = {"app.kubernetes.io/name": "medforge", "app.kubernetes.io/managed-by": MANAGED_BY}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": config_secret_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": {ANNOTATION_EXPIRES: expires_at},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "stringData": {CONFIG_KEY: json.dumps(config, sort_keys=True)},
    }


def redact_urls(text: str) -> str:
    """Remove every presigned query (its signature and credential) from a message copied into
    status, Events or logs (medforge_common.redact, shared with the job programs)."""
    return redact(text)


def owned_by(child: Obj, uid: str) -> bool:
    """Whether `child` (a Job, or a Job's pod) is controlled by the object with this uid (its
    controller owner reference), not just named or labelled as if it were."""
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def made_by_us(job: JSON) -> bool:
    labels = (job.get("metadata") or {}).get("labels") or {}
    return labels.get("app.kubernetes.io/managed-by") == MANAGED_BY


def owner_of(obj: Obj) -> str | None:
    """The name of the CR that a Job or pod of ours belongs to."""
    meta = obj.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(ANNOTATION_OWNER)
    return str(name) if name else (meta.get("labels") or {}).get(LABEL_OWNER)
