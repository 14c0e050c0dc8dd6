"""Pure builders of the batch/v1 Jobs the operator creates (plain dicts, as the API takes them)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from medforge_common.uris import S3Uri, parse_uri
from medforge_operator import GROUP, VERSION, names

JSON = dict[str, Any]
MANAGED_BY = "medforge-operator"
LABEL_COMPONENT = "medforge.io/component"
LABEL_OWNER = "medforge.io/owner"  # the owner's name as a label value (hashed past 63 chars)
ANNOTATION_OWNER = "medforge.io/owner-name"  # the owner's name in full, on Jobs and pods
LABEL_OWNER_NS = "medforge.io/owner-namespace"
LABEL_GENERATION = "medforge.io/generation"
LABEL_REVISION = "medforge.io/revision"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# The job's config without any URL (store URIs to be signed), kept on the Job so that fresh URLs
# can be signed whenever a pod is about to need them; the URL lifetime; the base model's digest.
ANNOTATION_PLAN = "medforge.io/job-plan"
ANNOTATION_URL_LIFETIME = "medforge.io/url-lifetime-seconds"
ANNOTATION_BASE_DIGEST = "medforge.io/base-model-digest"
ANNOTATION_BASE_NAME = "medforge.io/base-model"
ANNOTATION_EXPIRES = "medforge.io/urls-expire-at"
CONFIG_MOUNT = "/etc/medforge/job"
CONFIG_KEY = "config.json"


def owner_reference(obj: JSON) -> JSON:
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


def job_manifest(
    *,
    name: str,
    namespace: str,
    owner: JSON,
    component: str,
    image: str,
    command: list[str],
    plan: JSON,
    url_lifetime: int,
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
    container = {
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
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "job-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            *volume_mounts,
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    job_labels = dict(all_labels)
    if resources.get("queueName"):
        job_labels[KUEUE_QUEUE] = resources["queueName"]
    spec: JSON = {
        "backoffLimit": backoff_limit,
        "ttlSecondsAfterFinished": ttl_seconds,
        "template": {
            "metadata": {
                "labels": all_labels,
                "annotations": {ANNOTATION_OWNER: owner["metadata"]["name"]},
            },
            "spec": restricted_pod(
                container,
                resources,
                [
                    {
                        "name": "job-config",
                        "secret": {"secretName": config_secret_name(name), "defaultMode": 0o440},
                    },
                    *volumes,
                ],
            ),
        },
    }
    if active_deadline:
        spec["activeDeadlineSeconds"] = active_deadline
    if verdict_exit_codes:
        # An exit that is a verdict fails the Job at once: retrying it would only repeat it.
        spec["podFailurePolicy"] = {
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
    if resources.get("queueName"):
        # Kueue admits queued Jobs by unsuspending them; created suspended, none starts early.
        spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": job_labels,
            "annotations": {
                **annotations,
                ANNOTATION_OWNER: owner["metadata"]["name"],
                ANNOTATION_PLAN: json.dumps(plan, sort_keys=True, separators=(",", ":")),
                ANNOTATION_URL_LIFETIME: str(url_lifetime),
            },
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": spec,
    }


def get_ref(uri: S3Uri) -> JSON:
    """A file the Job will read, in a plan: signed into a GET URL when the config is written."""
    return {"get": str(uri)}


def put_ref(uri: S3Uri) -> JSON:
    """A file the Job will write, in a plan: signed into a PUT URL when the config is written."""
    return {"put": str(uri)}


def sign(
    plan: Any, presign_get: Callable[[S3Uri], str], presign_put: Callable[[S3Uri], str]
) -> Any:
    """The job config from its plan: every {"get": uri} becomes "url" beside the entry's other
    keys, every {"put": uri} becomes the PUT URL itself."""
    if isinstance(plan, list):
        return [sign(v, presign_get, presign_put) for v in plan]
    if not isinstance(plan, dict):
        return plan
    if set(plan) == {"put"}:
        return presign_put(_s3(plan["put"]))
    out = {k: sign(v, presign_get, presign_put) for k, v in plan.items() if k != "get"}
    if isinstance(plan.get("get"), str):
        out["url"] = presign_get(_s3(plan["get"]))
    return out


def _s3(value: str) -> S3Uri:
    uri = parse_uri(value, "job plan")
    if not isinstance(uri, S3Uri):
        raise ValueError(f"job plan: {value} is not an s3:// URI")
    return uri


def plan_of(job: JSON) -> JSON | None:
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_PLAN)
    try:
        plan = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
    return plan if isinstance(plan, dict) else None


def url_lifetime(job: JSON, default: int) -> int:
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_URL_LIFETIME)
    try:
        return max(60, min(int(raw or default), 7 * 24 * 3600))
    except ValueError:
        return default


def config_secret(job: JSON, config: JSON, expires_at: str) -> JSON:
    """The Secret that carries a Job's config, owned by the Job (deleted with it)."""
    meta = job["metadata"]
    labels = {
        k: v
        for k, v in (meta.get("labels") or {}).items()
        if k.startswith(("app.kubernetes.io/", "medforge.io/"))
    }
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


_SIGNED_QUERY = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")


def redact_urls(text: str) -> str:
    """Drop the query (the signature) of every URL in a message copied into status or Events:
    a presigned URL quoted in an error must not become readable to anyone who may view."""
    return _SIGNED_QUERY.sub(r"\1?<redacted>", text)


def job_state(job: JSON | None) -> str:
    """Active, Complete, Failed or Missing, from the Job's conditions."""
    if job is None:
        return "Missing"
    for c in job.get("status", {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            return str(c["type"])
    return "Active"


def never_started(job: JSON) -> bool:
    """A suspended Job with no pod counts and no start time has no pods to list: it is queued
    and not yet admitted, or it was suspended again (which deletes its pods and clears the
    start time) without any pod having failed or succeeded."""
    st = job.get("status") or {}
    return bool((job.get("spec") or {}).get("suspend")) and not (
        st.get("startTime")
        or st.get("active")
        or st.get("succeeded")
        or st.get("failed")
        or st.get("terminating")
    )


def owned_by(child: JSON, uid: str) -> bool:
    """Whether a Job is this object's own child (its controller owner reference), not just a
    Job that happens to have the right name."""
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def made_by_us(job: JSON) -> bool:
    labels = (job.get("metadata") or {}).get("labels") or {}
    return labels.get("app.kubernetes.io/managed-by") == MANAGED_BY


def owner_of(obj: JSON) -> str | None:
    """The name of the CR that a Job or pod of ours belongs to."""
    meta = obj.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(ANNOTATION_OWNER)
    return str(name) if name else (meta.get("labels") or {}).get(LABEL_OWNER)


def worth_a_round(etype: str, job: JSON) -> bool:
    """Whether a watch event of one of our Jobs can change its owner's status. Not while the
    Job is as we created it: no status yet, or suspended for Kueue and never admitted (the Job
    controller's Suspended condition). Its generation tells: admission and any later suspension
    change the spec, so a Job still at generation 1 has not been touched. A deletion always
    counts."""
    if etype == "DELETED":
        return True
    if not job.get("status"):
        return False
    return not (never_started(job) and (job.get("metadata") or {}).get("generation") == 1)


def job_failure(job: JSON) -> tuple[str, str]:
    for c in job.get("status", {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") == "Failed":
            return str(c.get("reason") or "JobFailed"), str(c.get("message") or "")
    return "JobFailed", ""


def pod_summary(pods: list[JSON]) -> JSON:
    """What the pods of a Job say: a container config error, whether one runs, the newest
    termination message of a succeeded and of a failed container."""
    out: JSON = {
        "attempts": len(pods),
        "running": False,
        "config_error": None,
        "success_message": None,
        "failure_message": None,
    }
    ordered = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    for i, pod in enumerate(ordered):
        newest = i == len(ordered) - 1
        job_name = (pod["metadata"].get("labels") or {}).get("job-name", "")
        own_secret = f'secret "{config_secret_name(job_name)}" not found'
        phase = pod.get("status", {}).get("phase")
        if phase == "Running":
            out["running"] = True
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            state = cs.get("state") or {}
            waiting = state.get("waiting") or {}
            if (
                newest
                and waiting.get("reason")
                in (
                    "CreateContainerConfigError",
                    "CreateContainerError",
                    "ImagePullBackOff",
                    "ErrImagePull",
                    "InvalidImageName",
                )
                and own_secret not in str(waiting.get("message", ""))
            ):
                # Our own config Secret follows the Job by a moment: not the user's problem.
                out["config_error"] = (
                    f"{waiting['reason']} in pod {pod['metadata']['name']}: "
                    f"{waiting.get('message', '')}"
                )
            term = state.get("terminated")
            if term:
                key = "success_message" if term.get("exitCode") == 0 else "failure_message"
                out[key] = redact_urls(str(term.get("message", "")))
    return out
