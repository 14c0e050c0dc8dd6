"""`medforge localcluster up|env|status|down` as a person types them."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from medforge_localcluster.cluster import ORDER, LocalCluster
from medforge_localcluster.processes import alive, port_free

CLI = [sys.executable, "-m", "medforge_localcluster.cli", "localcluster"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def test_up_is_idempotent_and_down_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    lc = LocalCluster(state)
    try:
        first = run("up", f"--state-dir={state}")
        assert first.returncode == 0, first.stderr
        st = lc.state()
        assert set(st.processes) == set(ORDER)
        pids = {name: rec.pid for name, rec in st.processes.items()}

        t0 = time.monotonic()
        again = run("up", f"--state-dir={state}")
        assert again.returncode == 0 and "already up" in again.stdout
        assert time.monotonic() - t0 < 10
        assert {name: rec.pid for name, rec in lc.state().processes.items()} == pids

        # `env` prints exports that make a plain `kubectl` talk to this cluster.
        exports = run("env", f"--state-dir={state}").stdout
        env = dict(os.environ)
        for line in exports.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
        nodes = subprocess.run(
            ["kubectl", "get", "nodes", "-o", "name"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert nodes.stdout.strip() == "node/medforge-local", nodes.stderr
        assert run("status", f"--state-dir={state}").returncode == 0
    finally:
        down = run("down", "--purge", f"--state-dir={state}")
    assert down.returncode == 0, down.stderr
    for name, rec in st.processes.items():
        assert not alive(rec), f"{name} (pid {rec.pid}) still runs after down"
    for name, port in st.ports.items():
        assert port_free(port), f"port {port} of {name} is still bound after down"
    assert not state.exists()
    assert run("status", f"--state-dir={state}").returncode == 1
