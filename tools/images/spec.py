"""What each image holds: its layers, its user, its environment and its entrypoint.

Pure data. The trainer and the merger share their first three layers (Debian, the ML
environment, the medforge wheel) so a node pulls torch once; the trainer adds a C toolchain,
which triton needs to build its launchers when torch.compile runs on a GPU.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = Path(__file__).resolve().parent / "lock"
SUITE = "bookworm"
# Fixed build time (2026-01-01T00:00:00Z): file times, the config's `created` and the SBOMs'
# timestamps all use it, so two builds of one commit give the same digests.
SOURCE_DATE_EPOCH = 1767225600
PREFIX = "/opt/medforge"  # the virtual environment inside every image
UID = 10001
HOME = "/scratch"

# Debian packages on top of the essential set. The base has the interpreter the wheels were
# locked for (CPython 3.11), the CA bundle for HTTPS to the store, and the C++ runtime that
# numpy's and torch's wheels link against (manylinux wheels do not bundle it).
BASE_PACKAGES = ("python3.11", "ca-certificates", "libstdc++6")
TOOLCHAIN_PACKAGES = ("gcc", "libc6-dev", "python3.11-dev")

# The extras of pyproject.toml that make each Python environment.
ENVIRONMENTS = {"operator": ("operator",), "ml": ("train", "merge")}

# Imported in the image's root after each build: a missing library or package fails the
# build instead of the first Job.
SMOKE = {
    "operator": ("medforge_operator.__main__",),
    "ml": (
        "medforge_trainer.__main__",
        "medforge_merger.__main__",
        "torch",
        "peft",
        "opacus",
        "model_signing",
    ),
}

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": f"{HOME}/hf",
}


@dataclass(frozen=True)
class Image:
    name: str
    entrypoint: str
    environment: str  # a key of ENVIRONMENTS
    toolchain: bool = False
    env: dict[str, str] = field(default_factory=dict)
    description: str = ""


IMAGES = (
    Image(
        "operator",
        "medforge-operator",
        "operator",
        description="The MedForge operator: reconciles contributions and composite models.",
    ),
    Image(
        "trainer",
        "medforge-train",
        "ml",
        toolchain=True,
        env=OFFLINE_ENV,
        description="medforge-train: trains a hospital's LoRA contribution in its namespace.",
    ),
    Image(
        "merger",
        "medforge-merge",
        "ml",
        env=OFFLINE_ENV,
        description="medforge-merge: merges verified contributions into a composite revision.",
    ),
)


def version() -> str:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return str(data["project"]["version"])


def repository(image: Image, registry: str = "ghcr.io/medforge") -> str:
    return f"{registry}/{image.name}"


def requirements(environment: str) -> list[str]:
    """The requirement strings of the extras that make an environment (pyproject.toml)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    seen: dict[str, None] = {}
    for extra in ENVIRONMENTS[environment]:
        for req in extras[extra]:
            seen.setdefault(req, None)
    return list(seen)


def config_env(image: Image) -> dict[str, str]:
    return {
        "PATH": f"{PREFIX}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": HOME,
        **image.env,
    }
