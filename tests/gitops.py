"""What GitOps tools make of MedForge objects: Argo CD's health (the chart's Lua checks, run
under Lua 5.1 semantics as Argo CD runs them) and kstatus (the library Flux and kpt use, through
the kstatus-check program built from its Go module)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARGOCD = ROOT / "helm" / "medforge" / "files" / "argocd"
FIXTURES = ROOT / "tests" / "fixtures" / "status"

# case -> (Argo CD health, kstatus status)
EXPECTED = {
    "contribution-succeeded": ("Healthy", "Current"),
    "contribution-training": ("Progressing", "InProgress"),
    "contribution-failed": ("Degraded", "Failed"),
    "contribution-stalled": ("Degraded", "Failed"),
    "composite-ready": ("Healthy", "Current"),
    "composite-waiting": ("Healthy", "Current"),
    "composite-paused": ("Suspended", "Current"),
    "composite-rejected": ("Degraded", "Current"),
    "composite-not-a-forge": ("Degraded", "Failed"),
    "basemodel-ready": ("Healthy", "Current"),
    "basemodel-failed": ("Degraded", "Failed"),
}


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """Run the chart's health check for obj's kind as Argo CD would: `obj` global, a table back."""
    import lupa.lua51 as lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert "Lua 5.1" in lua.eval("_VERSION")
    script = (ARGOCD / f"{obj['kind']}.lua").read_text()
    lua.globals().obj = _to_lua(lua, obj)
    result = lua.execute(script)
    return {"status": str(result["status"]), "message": str(result["message"] or "")}


def _to_lua(lua: Any, value: Any) -> Any:
    """JSON into Lua tables, arrays 1-based as Argo CD's conversion makes them."""
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def kstatus(objects: list[dict[str, Any]], binary: Path) -> list[dict[str, str]]:
    out = subprocess.run(
        [str(binary)],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    result: list[dict[str, str]] = json.loads(out)
    return result


def captured(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as a fixture: what the checks read, without server bookkeeping."""
    meta = obj["metadata"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "generation", "labels") if k in meta
        },
        "spec": obj.get("spec") or {},
        "status": {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"},
    }
