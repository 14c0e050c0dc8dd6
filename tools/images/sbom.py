"""CycloneDX SBOMs: the Python environment as cyclonedx-bom sees it, plus the Debian packages
of the root filesystem (from the lock, which the build checked against dpkg's database)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from tools.images.layer import JSON
from tools.images.rootfs import BuildError
from tools.images.spec import PREFIX, Image


def python(root: Path, out: Path, epoch: int) -> None:
    """cyclonedx-py's SBOM of the image's virtual environment, run from the outside: the
    environment's interpreter is the host's Debian python3.11, the same build as the image's."""
    interpreter = root / PREFIX.lstrip("/") / "bin" / "python"
    cmd = [str(Path(sys.executable).parent / "cyclonedx-py"), "environment"]
    cmd += ["--output-reproducible", "--of", "JSON", "-o", str(out), str(interpreter)]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"cyclonedx-py could not read {interpreter}: {done.stderr.strip()[-400:]}")


def debian_component(name: str, version: str) -> JSON:
    purl = f"pkg:deb/debian/{name}@{quote(version, safe='')}?distro=debian-12"
    return {"type": "library", "bom-ref": purl, "name": name, "version": version, "purl": purl}


def image(
    out: Path, img: Image, entry: JSON, debian: dict[str, str], python_bom: Path, epoch: int
) -> None:
    """One SBOM for the image: the image itself as the subject, every Python and Debian
    component in it."""
    doc: JSON = json.loads(python_bom.read_text())
    ref = entry["annotations"]["io.containerd.image.name"]
    subject = {
        "type": "container",
        "bom-ref": f"{ref}@{entry['digest']}",
        "name": ref.rsplit(":", 1)[0],
        "version": entry["digest"],
        "description": img.description,
    }
    doc.setdefault("metadata", {})["component"] = subject
    components = [c for c in doc.get("components", []) if c.get("name") != "medforge" or True]
    components += [debian_component(n, v) for n, v in sorted(debian.items())]
    doc["components"] = components
    doc["dependencies"] = [
        *doc.get("dependencies", []),
        {
            "ref": subject["bom-ref"],
            "dependsOn": sorted(c["bom-ref"] for c in components if "bom-ref" in c),
        },
    ]
    del epoch  # the timestamp came from SOURCE_DATE_EPOCH through cyclonedx-py
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
