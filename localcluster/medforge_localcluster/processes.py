"""Starting, tracking and stopping the background processes of the local cluster.

Each process runs in its own session (so a Ctrl-C in the shell that ran `up` does not reach it)
and is recorded with its pid and kernel start time, so that `down` never signals a recycled pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(str(data["name"]), int(data["pid"]), int(data["start_ticks"]))


def start_ticks(pid: int) -> int | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def alive(rec: ProcessRecord) -> bool:
    return start_ticks(rec.pid) == rec.start_ticks


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcessRecord:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    ticks = start_ticks(proc.pid)
    if ticks is None:
        raise RuntimeError(f"{name} exited at once; see {log_path}")
    return ProcessRecord(name, proc.pid, ticks)


def stop(rec: ProcessRecord, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `timeout` seconds."""
    if not alive(rec):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Reap it if it is our child, so that it does not linger as a zombie.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(rec.pid, os.WNOHANG)
        if not alive(rec):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(rec.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(rec.pid, 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """True when a server could listen on the port now (connections in TIME_WAIT do not count,
    as servers set SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for(
    what: str,
    check: Any,
    timeout: float,
    rec: ProcessRecord | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll `check()` until it returns truthy; fail early when the process died."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        if rec is not None and not alive(rec):
            raise RuntimeError(f"{what}: the process exited; {_log_tail(log_path)}")
        try:
            if check():
                return
        except Exception as exc:
            last_exc = exc
        time.sleep(0.2)
    reason = f" (last error: {last_exc})" if last_exc else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s{reason}; {_log_tail(log_path)}")


def _log_tail(log_path: Path | None, lines: int = 12) -> str:
    if log_path is None or not log_path.exists():
        return "no log"
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"last lines of {log_path}:\n" + "\n".join(tail)
