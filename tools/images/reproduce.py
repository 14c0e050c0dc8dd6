"""`make images-reproduce`: build the images twice from scratch (no layer cache, no Debian
trees kept; only the downloaded wheels are reused, and they are checked by hash) into two
temporary folders and compare every digest. Exits 1 naming each image that differs.

`python -m tools.images.reproduce operator` checks one image (about 2 minutes on two cores;
all three take about 15)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tools.images import rootfs
from tools.images.build import build
from tools.images.spec import IMAGES, ROOT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", default=[])
    args = parser.parse_args()
    selected = [i for i in IMAGES if not args.images or i.name in args.images]
    runs = []
    scratch = Path(tempfile.mkdtemp(prefix="medforge-reproduce-", dir=ROOT / "build"))
    try:
        for n in (1, 2):
            started = time.monotonic()
            summary = build(scratch / f"build-{n}", "ghcr.io/medforge", selected)
            print(f"build {n}: {time.monotonic() - started:.0f} s")
            runs.append({k: v["digest"] for k, v in summary["images"].items()})
            shutil.rmtree(scratch / f"build-{n}" / "work")  # the trees are not needed
    except rootfs.BuildError as exc:
        print(f"make images-reproduce: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    differ = [name for name in runs[0] if runs[0][name] != runs[1][name]]
    for name, digest in runs[0].items():
        print(f"{name}: {digest} {'DIFFERS: ' + runs[1][name] if name in differ else 'twice'}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
