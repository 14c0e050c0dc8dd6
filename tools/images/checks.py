"""Offline checks of the built images, read back from the OCI layout (not from the build's
trees): what a registry would get is what is checked."""

from __future__ import annotations

import gzip
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tools.images.layer import JSON
from tools.images.rootfs import BuildError
from tools.images.spec import OFFLINE_ENV, PREFIX, Image

# Compressed size budgets (bytes); the ML images are bounded by torch's CUDA build.
BUDGET = {"operator": 200_000_000}


@dataclass
class LayerScan:
    setuid: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # entrypoint scripts: their first line


def _scan(blob: Path) -> LayerScan:
    scan = LayerScan()
    bindir = PREFIX.lstrip("/") + "/bin/"
    with gzip.open(blob, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
        for member in tar:
            if member.mode & 0o6000:
                scan.setuid.append(member.name)
            if member.name.startswith(bindir) and member.isreg():
                f = tar.extractfile(member)
                scan.files[member.name] = f.readline(200) if f else b""
    return scan


def _scan_cached(blob: Path, cache: Path) -> LayerScan:
    """A layer's scan, kept beside the layer cache: blobs are content-addressed."""
    record = cache / f"scan-{blob.name}.json"
    if record.is_file():
        doc = json.loads(record.read_text())
        return LayerScan(doc["setuid"], {k: v.encode("latin-1") for k, v in doc["files"].items()})
    scan = _scan(blob)
    files = {k: v.decode("latin-1") for k, v in scan.files.items()}
    record.write_text(json.dumps({"setuid": scan.setuid, "files": files}))
    return scan


def run(layout: Path, images: list[Image], cache: Path) -> JSON:
    """Check every image; raises BuildError naming each failure, returns what was checked."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    scans: dict[str, LayerScan] = {}
    report: JSON = {}
    failures: list[str] = []
    for entry, img in zip(index["manifests"], images, strict=True):
        manifest = json.loads((blobs / entry["digest"].removeprefix("sha256:")).read_bytes())
        config = json.loads(
            (blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_bytes()
        )
        for la in manifest["layers"]:
            if la["digest"] not in scans:
                blob = blobs / la["digest"].removeprefix("sha256:")
                scans[la["digest"]] = _scan_cached(blob, cache)
        problems = _problems(
            img, manifest, config["config"], [scans[la["digest"]] for la in manifest["layers"]]
        )
        failures += [f"{img.name}: {p}" for p in problems]
        report[img.name] = {
            "user": config["config"]["User"],
            "setuidFiles": sum(len(scans[la["digest"]].setuid) for la in manifest["layers"]),
            "compressedBytes": sum(la["size"] for la in manifest["layers"]),
            "passed": not problems,
        }
    if failures:
        raise BuildError("image checks failed:\n  " + "\n  ".join(failures))
    return report


def _problems(img: Image, manifest: JSON, config: JSON, scans: list[LayerScan]) -> list[str]:
    out = []
    uid = str(config.get("User", "")).split(":")[0]
    if not uid.isdigit() or int(uid) == 0:
        out.append(f"the user must be a numeric non-root uid, not {config.get('User')!r}")
    setuid = [p for s in scans for p in s.setuid]
    if setuid:
        out.append(f"setuid or setgid files: {', '.join(setuid[:5])}")
    env = dict(e.split("=", 1) for e in config.get("Env", []))
    if img.env is OFFLINE_ENV or img.environment == "ml":
        out += [f"{k} must be {v!r} (offline)" for k, v in OFFLINE_ENV.items() if env.get(k) != v]
    entry = config["Entrypoint"][0].lstrip("/")
    files = {k: v for s in scans for k, v in s.files.items()}
    if entry not in files:
        out.append(f"the entrypoint {config['Entrypoint'][0]} is not in the image")
    elif not files[entry].startswith(f"#!{PREFIX}/bin/python".encode()):
        out.append(f"the entrypoint's interpreter is {files[entry][:80]!r}, not the image's own")
    labels = config.get("Labels") or {}
    for key in ("org.opencontainers.image.version", "org.opencontainers.image.revision"):
        if not labels.get(key):
            out.append(f"label {key} is missing")
    size = sum(la["size"] for la in manifest["layers"])
    if size > BUDGET.get(img.name, 1 << 62):
        out.append(
            f"{size / 1e6:.0f} MB compressed, over the budget of {BUDGET[img.name] / 1e6:.0f} MB"
        )
    return out
