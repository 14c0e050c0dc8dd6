"""Pure builders of the batch/v1 Jobs the operator creates (plain dicts, as the API takes them)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from medforge_common.api import ExitCode
from medforge_common.redact import redact
from medforge_common.uris import S3Uri
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
# For people reading the Job only: a member namespace is the tenant's to write, so the operator
# never reads its children's annotations back (its record of each Job is in the owner's status).
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
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
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


def plan_digest(plan: JSON) -> str:
    """A plan's identity, recorded in the owner's status when its Job is created: a queued Job
    whose plan would differ now is replaced before it starts."""
    raw = json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


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


MAX_MESSAGE_CHARS = 4096  # a kubelet keeps at most 4 KiB of a termination message


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
        "failure_exit": None,  # exit code and reason (OOMKilled, Error) of the newest failure
        "failure_reason": None,
        "disrupted": False,  # the newest pod was evicted or disrupted (a node drained or lost)
    }
    ordered = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    for i, pod in enumerate(ordered):
        newest = i == len(ordered) - 1
        job_name = (pod["metadata"].get("labels") or {}).get("job-name", "")
        own_secret = f'secret "{config_secret_name(job_name)}" not found'
        phase = pod.get("status", {}).get("phase")
        if phase == "Running":
            out["running"] = True
        if newest:
            out["disrupted"] = pod.get("status", {}).get("reason") == "Evicted" or any(
                c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                for c in pod.get("status", {}).get("conditions") or []
            )
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
                out["config_error"] = redact_urls(
                    f"{waiting['reason']} in pod {pod['metadata']['name']}: "
                    f"{str(waiting.get('message', ''))[:MAX_MESSAGE_CHARS]}"
                )
            term = state.get("terminated")
            if term:
                key = "success_message" if term.get("exitCode") == 0 else "failure_message"
                out[key] = redact_urls(str(term.get("message", ""))[:MAX_MESSAGE_CHARS])
                if term.get("exitCode") != 0:
                    out["failure_exit"] = term.get("exitCode")
                    out["failure_reason"] = term.get("reason")
    return out


def caused_by_inputs(summary: JSON) -> bool:
    """Whether a failed Job's newest pod failed in a way its inputs can explain: the program
    exited non-zero by itself (or was killed for memory), not because the store could not be
    reached, the pod was evicted or disrupted, or its node was lost (no exit code at all). Only
    such failures count toward isolating an input; the others are retried."""
    code = summary.get("failure_exit")
    if summary.get("disrupted") or not isinstance(code, int) or isinstance(code, bool):
        return False
    if summary.get("failure_reason") == "OOMKilled":
        return True
    # A refused job config is the operator's doing, never an input's. 137 and 143 without
    # OOMKilled: SIGKILL or SIGTERM from outside (a node shutting down).
    return code not in (ExitCode.BAD_CONFIG, ExitCode.STORE_FAULT, 137, 143)
