"""The Python environment inside an image: locked wheels, installed by pip in a chroot.

pip runs from its own locked wheel (`python pip.whl/pip`), so it never lands in the image;
SOURCE_DATE_EPOCH makes the byte-compiled files hash-checked rather than stamped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.images.rootfs import BuildError
from tools.images.spec import PREFIX, ROOT

# Where the wheels are staged inside the image's root while pip runs (removed after).
STAGE = "/tmp/wheels"  # noqa: S108 - a path in the image being built, not on the host
WHEEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medforge" / "wheels"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheels(wheels: list[dict[str, str]]) -> None:
    """Download the locked wheels missing from the cache; every one is checked by its hash."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    missing = [w for w in wheels if not (WHEEL_CACHE / w["file"]).is_file()]
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
            req.write(
                "".join(
                    f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}\n" for w in missing
                )
            )
            req.flush()
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
            cmd += [
                "--only-binary=:all:",
                "--require-hashes",
                "-d",
                str(WHEEL_CACHE),
                "-r",
                req.name,
            ]
            subprocess.run(cmd, check=True)
    for w in wheels:
        if sha256(WHEEL_CACHE / w["file"]) != w["sha256"]:
            raise BuildError(
                f"{WHEEL_CACHE / w['file']} does not match the lock's sha256: delete it"
            )


def medforge_wheel(dest: Path, epoch: int) -> Path:
    """The medforge wheel, built from the working tree's files (tracked and new, not ignored)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for rel in filter(None, files):
            if (ROOT / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, src / rel)
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
        cmd += ["--no-build-isolation", "-w", str(dest), str(src)]
        subprocess.run(cmd, check=True, env=env, cwd=tmp, capture_output=True)
    (wheel,) = dest.glob("medforge-*.whl")
    return wheel


def install(
    root: Path, pip_wheel: Path, wheels: list[Path], requirements: list[str], epoch: int
) -> None:
    """pip install `requirements` (no index, no dependencies beyond those listed) into the
    image's virtual environment, creating it first when it is missing."""
    stage = root / STAGE.lstrip("/")
    stage.mkdir(parents=True, exist_ok=True)
    try:
        for w in [pip_wheel, *wheels]:
            try:
                os.link(w, stage / w.name)
            except OSError:
                shutil.copy(w, stage / w.name)
        (stage / "requirements.txt").write_text("\n".join(requirements) + "\n")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/tmp",  # noqa: S108 - inside the image root
            "LANG": "C.UTF-8",
            "SOURCE_DATE_EPOCH": str(epoch),
            "PYTHONHASHSEED": "0",
            "PIP_NO_CACHE_DIR": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        if not (root / PREFIX.lstrip("/") / "bin" / "python").exists():
            _chroot(root, ["/usr/bin/python3.11", "-m", "venv", "--without-pip", PREFIX], env)
        cmd = [f"{PREFIX}/bin/python", f"{STAGE}/{pip_wheel.name}/pip", "install", "--quiet"]
        cmd += [
            "--no-index",
            "--no-deps",
            "--find-links",
            STAGE,
            "--no-warn-script-location",
        ]
        cmd += ["-r", f"{STAGE}/requirements.txt"]
        _chroot(root, cmd, env)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def smoke(root: Path, modules: tuple[str, ...]) -> None:
    """Import `modules` with the image's own interpreter (no bytecode written)."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    # torch opens /dev/urandom on import; the image has no device nodes (the runtime mounts
    # /dev), so a few are lent for the check and removed, the directories' times restored.
    dev = root / "dev"
    times = {d: d.stat() for d in (root, dev) if d.exists()}
    made_dir = not dev.exists()
    made: list[Path] = []
    try:
        dev.mkdir(exist_ok=True)
        for name, (major, minor) in {"null": (1, 3), "zero": (1, 5), "urandom": (1, 9)}.items():
            node = dev / name
            if not node.exists():
                os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
                made.append(node)
        _chroot(root, [f"{PREFIX}/bin/python", "-c", code, *modules], env)
    finally:
        for node in made:
            node.unlink(missing_ok=True)
        if made_dir:
            shutil.rmtree(dev, ignore_errors=True)
        for d, st in times.items():
            if d.exists():
                os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))


def _chroot(root: Path, argv: list[str], env: dict[str, str]) -> None:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    done = subprocess.run(
        [chroot, str(root), *argv], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise BuildError(f"in the image root ({' '.join(argv[:3])} ...) failed:\n{tail}")
