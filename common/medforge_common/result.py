"""The result a Job writes to its termination-message path (read back by the operator)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medforge_common.contract import ResultReference
from medforge_common.manifest import digest_of
from medforge_common.redact import redact

DEFAULT_PATH = Path("/dev/termination-log")
MAX_BYTES = 4096  # what a kubelet keeps of a termination message


class ResultTooLarge(ValueError):
    pass


def encode_result(result: Mapping[str, Any]) -> str:
    text = json.dumps(result, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > MAX_BYTES:
        raise ResultTooLarge(
            f"the result is {len(text.encode())} bytes; at most {MAX_BYTES} "
            "fit in a termination message"
        )
    return text


def failure_line(reason: str) -> str:
    """One line, cut to fit, for a failed Job."""
    line = " ".join(redact(reason).split())
    return line.encode()[: MAX_BYTES - 1].decode(errors="ignore")


def write_result(result: dict[str, Any], path: Path = DEFAULT_PATH) -> None:
    path.write_text(encode_result(result))


def write_failure(reason: str, path: Path = DEFAULT_PATH) -> None:
    path.write_text(failure_line(reason))


MAX_RESULT_FILE_BYTES = 16 << 20


def result_reference(result: dict[str, Any], body: bytes, name: str) -> ResultReference:
    """What the termination message carries when the full result went to the store as a file
    (`body`, its bytes): the artifact, the score, and the file's digest, so that a result of
    any size (a thousand inputs) is reported while the message stays far below 4 KiB."""
    ref: ResultReference = {
        "artifact": {
            k: result["artifact"][k] for k in ("digest", "uri") if k in result["artifact"]
        },
        "resultFile": {
            "name": name,
            "digest": digest_of(body),
            "sizeBytes": len(body),
        },
    }
    if "score" in result:
        ref["score"] = result["score"]
    return ref


def finite_number(value: Any) -> float | None:
    """A figure a job reported, if it is a finite number (not a bool, a string, NaN or Inf):
    what may become a status field or a metric."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def read_result(message: str) -> dict[str, Any] | None:
    """The operator's side: a JSON object for a success, None for a failure line."""
    try:
        data = json.loads(message)
    except (json.JSONDecodeError, TypeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def finish(path: Path, text: str, code: int) -> int:
    """Write the result (or failure line) to the termination-message path and echo it; returns
    the exit code. Run by hand there may be no such path: the echo then says it all. No
    presigned query is ever written there (the termination message is visible to viewers)."""
    text = redact(text)
    with contextlib.suppress(OSError):
        path.write_text(text)
    print(text, file=sys.stdout if code == 0 else sys.stderr, flush=True)
    return code


class JobConfigError(ValueError):
    pass


def read_job_config(path: str | None) -> Any:
    """The job config from `--config PATH`, else the file $MEDFORGE_JOB_CONFIG_FILE names (the
    operator mounts it from a Secret), else $MEDFORGE_JOB_CONFIG (by hand), parsed;
    JobConfigError says how to give one. Also creates $TMPDIR: in a Job it lies on the scratch
    emptyDir, the root filesystem being read-only."""
    path = path or os.environ.get("MEDFORGE_JOB_CONFIG_FILE")
    try:
        raw = Path(path).read_text() if path else os.environ["MEDFORGE_JOB_CONFIG"]
        cfg = json.loads(raw)
    except (KeyError, OSError, json.JSONDecodeError) as exc:
        raise JobConfigError(
            f"no readable job config ({exc}); pass --config, or set MEDFORGE_JOB_CONFIG_FILE "
            "or MEDFORGE_JOB_CONFIG"
        ) from exc
    if os.environ.get("TMPDIR"):
        Path(os.environ["TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return cfg


def job_parser(prog: str, description: str, outputs: str) -> argparse.ArgumentParser:
    """The arguments every job program of the contract takes: the job config, local outputs
    instead of the config's URLs, and where the result goes (the termination message)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--config",
        help="job config JSON file (default: $MEDFORGE_JOB_CONFIG_FILE, else $MEDFORGE_JOB_CONFIG)",
    )
    p.add_argument("--output-dir", help=f"write {outputs} here instead of the config's URLs")
    p.add_argument(
        "--termination-log", default=os.environ.get("MEDFORGE_TERMINATION_LOG", str(DEFAULT_PATH))
    )
    return p
