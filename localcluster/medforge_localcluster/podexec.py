"""Container entry for the process kubelet: set up the pod's mounts, then exec the command.

Runs inside a private mount namespace (``unshare --mount --propagation private``), so the bind
mounts below are seen by this process tree alone. A mount point that does not exist on the host
is created first and recorded, so that ``medforge localcluster down --purge`` can remove it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import sys
from pathlib import Path

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _ensure_target(target: Path, is_file: bool, created_log: Path) -> None:
    if target.exists():
        return
    missing = target
    while not missing.parent.exists():
        missing = missing.parent
    if is_file:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    else:
        target.mkdir(parents=True, exist_ok=True)
    with created_log.open("a") as f:
        f.write(f"{missing}\n")


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    created_log = Path(spec["createdLog"])
    try:
        for m in sorted(spec["mounts"], key=lambda m: len(Path(m["target"]).parts)):
            target = Path(m["target"])
            _ensure_target(target, Path(m["source"]).is_file(), created_log)
            _mount(m["source"], str(target), MS_BIND | MS_REC)
            if m.get("readOnly"):
                _mount(None, str(target), MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
    except OSError as exc:
        print(f"process kubelet: could not set up the pod's mounts: {exc}", file=sys.stderr)
        return 128
    workdir = spec.get("workingDir") or spec["defaultWorkingDir"]
    try:
        os.chdir(workdir)
    except OSError as exc:
        print(f"process kubelet: workingDir {workdir}: {exc.strerror}", file=sys.stderr)
        return 128
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])  # noqa: S606 - running the pod's command is the job
    except OSError as exc:
        message = f'exec: "{argv[0]}": {exc.strerror}'
        term = spec.get("terminationMessagePath")
        if term:
            with contextlib.suppress(OSError):
                Path(term).write_text(message)
        print(message, file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
