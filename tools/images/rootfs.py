"""Debian root filesystems from the package archive, with mmdebstrap.

mmdebstrap installs Debian's essential set plus the packages an image needs, from the same
apt sources as the host, with SOURCE_DATE_EPOCH set (its output is then reproducible). Every
package is pinned to the version in the lock: an archive that no longer serves that version
fails the build and says how to record the new one.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from tools.images.spec import HOME, SUITE, UID


class BuildError(Exception):
    """A step of the image build failed; the message says which and what to do."""


# Files that record when or on which machine a build ran, not what it holds.
VOLATILE = (
    "var/log",
    "var/cache/apt",
    "var/cache/ldconfig/aux-cache",
    "var/lib/apt/lists",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/lib/dpkg/stat-override-old",
    "etc/machine-id",
)


def apt_sources() -> Path:
    """The host's apt sources: the image comes from the archive this machine installs from."""
    for candidate in (
        Path("/etc/apt/sources.list.d/debian.sources"),
        Path("/etc/apt/sources.list"),
    ):
        if candidate.is_file() and candidate.read_text().strip():
            return candidate
    raise BuildError("no apt sources on this machine (/etc/apt/sources.list.d/debian.sources)")


def debootstrap(target: Path, packages: tuple[str, ...], pins: dict[str, str], epoch: int) -> None:
    """A root filesystem of Debian's essential set plus `packages`, each at its pinned version."""
    if shutil.which("mmdebstrap") is None:
        raise BuildError("mmdebstrap is not installed: `apt-get install mmdebstrap runc`")
    if target.exists():
        shutil.rmtree(target)
    wanted = [f"{p}={pins[p]}" if p in pins else p for p in sorted({*packages, *pins})]
    cmd = [
        "mmdebstrap",
        "--variant=essential",
        "--mode=root",
        "--quiet",
        f"--include={','.join(wanted)}",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        SUITE,
        str(target),
        str(apt_sources()),
    ]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise BuildError(
            f"mmdebstrap failed for {', '.join(packages)}:\n{tail}\n"
            "If a pinned version is gone from the archive, record the current ones with "
            "`make images-lock` and commit tools/images/lock/."
        )
    _tidy(target)


def _tidy(root: Path) -> None:
    """Drop per-build files and device nodes, clear setuid/setgid, add the medforge user."""
    for rel in VOLATILE:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                shutil.rmtree(
                    child
                ) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif path.exists():
            path.unlink()
    for rel in ("dev", "proc", "sys", "run", "tmp"):
        shutil.rmtree(root / rel, ignore_errors=True)
        (root / rel).mkdir(mode=0o755)
    (root / "tmp").chmod(0o1777)
    (root / "etc/machine-id").write_text("")
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                path.chmod(stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))
    with (root / "etc/passwd").open("a") as f:
        f.write(f"medforge:x:{UID}:{UID}:MedForge:{HOME}:/usr/sbin/nologin\n")
    with (root / "etc/group").open("a") as f:
        f.write(f"medforge:x:{UID}:\n")
    scratch = root / HOME.lstrip("/")
    scratch.mkdir(mode=0o755)
    os.chown(scratch, UID, UID)


def installed(root: Path) -> dict[str, str]:
    """name -> version of every package dpkg installed in root."""
    out: dict[str, str] = {}
    for para in (root / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in para.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status", "").endswith(" installed"):
            out[fields["Package"]] = fields["Version"]
    return out


def check_pins(root: Path, pins: dict[str, str], what: str) -> None:
    got = installed(root)
    wrong = [f"{p} {got.get(p, 'absent')} (lock: {v})" for p, v in pins.items() if got.get(p) != v]
    extra = sorted(set(got) - set(pins))
    if wrong or extra:
        raise BuildError(
            f"the {what} root filesystem differs from tools/images/lock: "
            + "; ".join([*wrong, *(f"{p} not in the lock" for p in extra)])
            + ". Run `make images-lock` and commit the lock."
        )
