"""`medforge-merge`: job config in, verified inputs, a streamed merge, the composite and its
manifest out (presigned PUT URLs, or a directory by hand), the result JSON in the
termination message. Any failure: non-zero exit and a one-line reason there."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from medforge_common.api import ExitCode
from medforge_common.manifest import ManifestError
from medforge_common.result import failure_line, job_parser
from medforge_merger import config, pipeline
from medforge_merger.allocator import keep_freed_memory
from medforge_merger.attest import SigningFailed
from medforge_merger.inputs import StoreFault
from medforge_merger.pipeline import JobFailed, NoUsableInput
from medforge_merger.strategies import MergeError
from medforge_ml.job import Ladder, Run, line, run_job
from medforge_ml.transfers import StoreError


def _work(run: Run[config.MergeConfig]) -> Mapping[str, Any]:
    if run.output_dir is not None:
        run.output_dir.mkdir(parents=True, exist_ok=True)
    result = pipeline.run(run.cfg, run.work, run.output_dir)
    return pipeline.publish_result(run.cfg, result, run.work, run.output_dir)


def _no_usable_input(exc: BaseException, run: Run[config.MergeConfig]) -> tuple[str, int] | None:
    if not isinstance(exc, NoUsableInput):
        return None
    return pipeline.verdict(run.cfg, exc, run.work, run.output_dir), ExitCode.VERDICT


def _out_of_memory(_exc: BaseException, _run: Any) -> tuple[str, int]:
    why = "merge failed: out of memory; give the merge Job more memory"
    return failure_line(why), ExitCode.FAILED


LADDER: Ladder[config.MergeConfig] = [
    (NoUsableInput, _no_usable_input),
    # No input explains a store fault: the operator retries the revision and blames nobody.
    ((StoreFault, StoreError), line("merge failed: the store", ExitCode.STORE_FAULT)),
    ((JobFailed, MergeError, ManifestError, KeyError, SigningFailed), line("merge failed")),
    (MemoryError, _out_of_memory),
]


def main(argv: list[str] | None = None) -> int:
    p = job_parser("medforge-merge", (__doc__ or "").splitlines()[0], "the composite")
    args = p.parse_args(argv)
    keep_freed_memory()
    return run_job(args, config.parse, _work, LADDER, "merge", "merge failed")


if __name__ == "__main__":
    sys.exit(main())
