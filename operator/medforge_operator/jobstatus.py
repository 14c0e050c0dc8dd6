"""What a Job and its pods say: the Job's state, its failure, its pods' termination messages
and exit codes, and whether a failure is one its inputs can explain (pure)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypedDict

from medforge_common.api import ExitCode
from medforge_operator.jobs import config_secret_name, redact_urls

JSON = dict[str, Any]

MAX_MESSAGE_CHARS = 4096  # a kubelet keeps at most 4 KiB of a termination message


class JobState(StrEnum):
    """Where a Job stands, from the Job controller's conditions (Kubernetes' words)."""

    ACTIVE = "Active"
    COMPLETE = "Complete"
    FAILED = "Failed"
    MISSING = "Missing"


class PodSummary(TypedDict):
    """What the pods of a Job say (pod_summary)."""

    attempts: int
    running: bool
    config_error: str | None  # a container config error of the newest pod, redacted
    success_message: str | None  # the newest succeeded container's termination message
    failure_message: str | None  # ... and the newest failed one's
    failure_exit: int | None  # exit code and reason (OOMKilled, Error) of the newest failure
    failure_reason: str | None
    disrupted: bool  # the newest pod was evicted or disrupted (a node drained or lost)


def job_state(job: JSON | None) -> JobState:
    """Active, Complete, Failed or Missing, from the Job's conditions."""
    if job is None:
        return JobState.MISSING
    for c in job.get("status", {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in (JobState.COMPLETE, JobState.FAILED):
            return JobState(c["type"])
    return JobState.ACTIVE


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


def pod_summary(pods: list[JSON]) -> PodSummary:
    """What the pods of a Job say: a container config error, whether one runs, the newest
    termination message of a succeeded and of a failed container."""
    out = PodSummary(
        attempts=len(pods),
        running=False,
        config_error=None,
        success_message=None,
        failure_message=None,
        failure_exit=None,
        failure_reason=None,
        disrupted=False,
    )
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
                message = redact_urls(str(term.get("message", ""))[:MAX_MESSAGE_CHARS])
                if term.get("exitCode") == 0:
                    out["success_message"] = message
                else:
                    out["failure_message"] = message
                    out["failure_exit"] = term.get("exitCode")
                    out["failure_reason"] = term.get("reason")
    return out


def caused_by_inputs(summary: PodSummary | JSON) -> bool:
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
