"""`make images-lock`: record the exact inputs of the images in tools/images/lock/.

- debian-base.txt, debian-toolchain.txt: every Debian package and its version, from a fresh
  mmdebstrap of the image's package list;
- python-<environment>.txt: every wheel (name, version, sha256, file name), resolved by pip
  for CPython 3.11 on x86_64 Linux from the pyproject extras, wheels only;
- python-pip.txt: the pip wheel that installs them at build time (not kept in the images).
Commit the files: `make images` builds from them and nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.images import rootfs
from tools.images.spec import (
    BASE_PACKAGES,
    ENVIRONMENTS,
    LOCK,
    SOURCE_DATE_EPOCH,
    TOOLCHAIN_PACKAGES,
    requirements,
)


def write_debian(name: str, packages: dict[str, str]) -> None:
    lines = [f"{p} {v}" for p, v in sorted(packages.items())]
    (LOCK / f"debian-{name}.txt").write_text("\n".join(lines) + "\n")


def read_debian(name: str) -> dict[str, str]:
    path = LOCK / f"debian-{name}.txt"
    if not path.is_file():
        raise rootfs.BuildError(f"{path} is missing: run `make images-lock`")
    return dict(line.split(" ", 1) for line in path.read_text().splitlines() if line)


def resolve(reqs: list[str]) -> list[dict[str, str]]:
    """pip's resolution of `reqs` as wheels: name, version, sha256 and file name of each."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run"]
        cmd += ["--ignore-installed", "--only-binary=:all:", "--report", str(report), *reqs]
        subprocess.run(cmd, check=True)
        doc = json.loads(report.read_text())
    out = []
    for item in doc["install"]:
        url = item["download_info"]["url"]
        out.append(
            {
                "name": item["metadata"]["name"],
                "version": item["metadata"]["version"],
                "sha256": item["download_info"]["archive_info"]["hashes"]["sha256"],
                "file": url.rsplit("/", 1)[1],
            }
        )
    return sorted(out, key=lambda w: w["name"].lower())


def write_python(name: str, wheels: list[dict[str, str]]) -> None:
    lines = [
        f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}  # {w['file']}" for w in wheels
    ]
    (LOCK / f"python-{name}.txt").write_text("\n".join(lines) + "\n")


def read_python(name: str) -> list[dict[str, str]]:
    path = LOCK / f"python-{name}.txt"
    if not path.is_file():
        raise rootfs.BuildError(f"{path} is missing: run `make images-lock`")
    out = []
    for line in path.read_text().splitlines():
        req, _, file = line.partition("  # ")
        pin, _, digest = req.partition(" --hash=sha256:")
        name_, _, version = pin.partition("==")
        out.append({"name": name_, "version": version, "sha256": digest, "file": file})
    return out


def main() -> None:
    LOCK.mkdir(parents=True, exist_ok=True)
    for env in ENVIRONMENTS:
        write_python(env, resolve(requirements(env)))
    write_python("pip", [w for w in resolve(["pip"]) if w["name"] == "pip"])
    with tempfile.TemporaryDirectory(dir=LOCK.parents[2] / "build") as tmp:
        for name, packages in (
            ("base", BASE_PACKAGES),
            ("toolchain", BASE_PACKAGES + TOOLCHAIN_PACKAGES),
        ):
            target = Path(tmp) / name
            rootfs.debootstrap(target, packages, {}, SOURCE_DATE_EPOCH)
            write_debian(name, rootfs.installed(target))
    print(f"wrote {LOCK}")


if __name__ == "__main__":
    main()
