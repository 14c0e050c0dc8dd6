"""The scaffold the trainer and the merger run their work in: read and parse the job config,
a temporary folder, the work itself, and one ladder from exceptions to a one-line reason and
an exit code (medforge_common.api.ExitCode) in the termination message; a result JSON on
success. Nothing is a bare traceback there: an unforeseen error's traceback goes to the log,
redacted, and its type and message to the termination message."""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from medforge_common.api import ExitCode
from medforge_common.redact import redact
from medforge_common.result import (
    JobConfigError,
    encode_result,
    failure_line,
    finish,
    read_job_config,
)

C = TypeVar("C")


@dataclass(frozen=True)
class Run(Generic[C]):
    """What a failure handler may need: the parsed config, the work folder, the local outputs."""

    cfg: C
    work: Path
    output_dir: Path | None


# A handler turns an exception into (termination message, exit code), or None to pass it on
# to the next rung.
Handler = Callable[[BaseException, Run[C]], tuple[str, int] | None]
Ladder = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], Handler[C]]]


def line(
    prefix: str, code: int = ExitCode.FAILED
) -> Callable[[BaseException, Any], tuple[str, int]]:
    """A handler that reports `<prefix>: <the exception's message>`."""
    return lambda exc, _run: (failure_line(f"{prefix}: {exc}"), code)


def run_job(
    args: argparse.Namespace,
    parse: Callable[[Any], C],
    work: Callable[[Run[C]], Mapping[str, Any]],
    ladder: Ladder[C],
    name: str,
    failed: str,
) -> int:
    """Run one job: `parse` raises JobConfigError naming the field (exit 2), `work` returns
    the result JSON for the termination message (exit 0), and the first matching rung of
    `ladder` that answers reports a failure; anything else is `<failed>: <type>: <message>`."""
    term = Path(args.termination_log)
    try:
        cfg = parse(read_job_config(args.config))
    except JobConfigError as exc:
        return finish(term, failure_line(str(exc)), ExitCode.BAD_CONFIG)
    out_dir = Path(args.output_dir) if args.output_dir else None
    with tempfile.TemporaryDirectory(prefix=f"medforge-{name}-") as tmp:
        run = Run(cfg, Path(tmp), out_dir)
        try:
            result = work(run)
        except Exception as exc:
            for kinds, handler in ladder:
                if isinstance(exc, kinds) and (answer := handler(exc, run)) is not None:
                    return finish(term, *answer)
            print(redact(traceback.format_exc()), file=sys.stderr, flush=True)
            message = f"{failed}: {type(exc).__name__}: {exc}"
            return finish(term, failure_line(message), ExitCode.FAILED)
    return finish(term, encode_result(result), ExitCode.OK)
