"""`make images`: build the operator, trainer and merger images into one OCI image layout.

Output in build/images/: oci/ (the layout; index.json names each image by its full reference),
<image>.cdx.json (the SBOMs) and images.json (references, digests, sizes, check results).
Layers are cached by the hash of their inputs (locks, builder code, the medforge wheel), so a
rebuild reuses them; `--no-cache` starts clean. Needs root, mmdebstrap, and tools/images/lock/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from tools.images import checks, lock, rootfs, sbom
from tools.images.layer import (
    CONFIG_MEDIA,
    JSON,
    MANIFEST_MEDIA,
    Layer,
    canonical,
    diff,
    walk,
    write_blob,
    write_index,
    write_layer,
)
from tools.images.python_env import (
    STAGE,
    WHEEL_CACHE,
    fetch_wheels,
    install,
    medforge_wheel,
    sha256,
    smoke,
)
from tools.images.spec import (
    BASE_PACKAGES,
    HOME,
    IMAGES,
    LOCK,
    PREFIX,
    ROOT,
    SMOKE,
    SOURCE_DATE_EPOCH,
    TOOLCHAIN_PACKAGES,
    UID,
    Image,
    config_env,
    repository,
    version,
)

# The code that decides what goes into a layer: a change to it rebuilds every layer.
BUILDER = hashlib.sha256(
    b"".join(
        (Path(__file__).parent / f).read_bytes()
        for f in ("layer.py", "rootfs.py", "python_env.py", "spec.py")
    )
).hexdigest()
SOURCE = "https://github.com/medforge/medforge"


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def revision() -> str:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    )
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


class Builder:
    """Builds each layer once (cached by input hash) and assembles the images from them."""

    def __init__(self, out: Path, registry: str) -> None:
        self.out, self.registry = out, registry
        self.layout = out / "oci"
        self.blobs = self.layout / "blobs" / "sha256"
        self.work, self.cache = out / "work", out / "layer-cache"
        for d in (self.blobs, self.work, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        self.epoch = SOURCE_DATE_EPOCH
        self.timings: dict[str, float] = {}
        self.base_key = _key(BUILDER, (LOCK / "debian-base.txt").read_text())
        self.wheel: Path | None = None

    def _cached(self, key: str) -> Layer | None:
        record = self.cache / f"{key}.json"
        if not record.is_file():
            return None
        layer = Layer(**json.loads(record.read_text()))
        return layer if (self.blobs / layer.digest.removeprefix("sha256:")).is_file() else None

    def _layer(
        self, key: str, what: str, root: Path, paths: list[str], deleted: tuple[str, ...] = ()
    ) -> Layer:
        started = time.monotonic()
        layer = write_layer(root, paths, self.blobs, self.epoch, deleted)
        self.timings[f"pack {what}"] = round(time.monotonic() - started, 1)
        (self.cache / f"{key}.json").write_text(json.dumps(layer.__dict__))
        return layer

    def rootfs(self, name: str, packages: tuple[str, ...]) -> Path:
        """The Debian tree `name`, made afresh unless a complete one from this lock exists."""
        pins = lock.read_debian(name)
        target, stamp = self.work / name, self.work / f"{name}.key"
        key = _key(BUILDER, json.dumps(pins, sort_keys=True))
        if not (stamp.is_file() and stamp.read_text() == key and target.is_dir()):
            stamp.unlink(missing_ok=True)
            started = time.monotonic()
            rootfs.debootstrap(target, packages, pins, self.epoch)
            rootfs.check_pins(target, pins, name)
            stamp.write_text(key)
            self.timings[f"debian {name}"] = round(time.monotonic() - started, 1)
        return target

    def base(self) -> Layer:
        layer = self._cached(self.base_key)
        if layer is None:
            root = self.rootfs("base", BASE_PACKAGES)
            layer = self._layer(self.base_key, "debian base", root, list(walk(root)))
        return layer

    def toolchain(self) -> Layer:
        key = _key(self.base_key, (LOCK / "debian-toolchain.txt").read_text())
        layer = self._cached(key)
        if layer is None:
            lower = self.rootfs("base", BASE_PACKAGES)
            upper = self.rootfs("toolchain", BASE_PACKAGES + TOOLCHAIN_PACKAGES)
            changed, deleted = diff(lower, upper)
            layer = self._layer(key, "toolchain", upper, changed, tuple(deleted))
        return layer

    def environment(self, env: str) -> tuple[Layer, Layer, Path]:
        """The layers of an environment's locked wheels and of the medforge wheel on top, and
        the environment's Python SBOM."""
        wheels, pip = lock.read_python(env), lock.read_python("pip")
        fetch_wheels([*wheels, *pip])
        if self.wheel is None:
            self.wheel = medforge_wheel(self.work / "wheel", self.epoch)
        deps_key = _key(self.base_key, (LOCK / f"python-{env}.txt").read_text(), pip[0]["sha256"])
        app_key = _key(deps_key, sha256(self.wheel))
        deps, app = self._cached(deps_key), self._cached(app_key)
        bom = self.cache / f"{app_key}.python.cdx.json"
        if deps and app and bom.is_file():
            return deps, app, bom
        root = self.rootfs("base", BASE_PACKAGES)
        venv, parked, stamp = (
            root / PREFIX.lstrip("/"),
            self.work / f"venv-{env}",
            self.work / f"venv-{env}.key",
        )
        shutil.rmtree(venv, ignore_errors=True)
        pip_wheel = WHEEL_CACHE / pip[0]["file"]
        if stamp.is_file() and stamp.read_text() == deps_key and parked.is_dir():
            parked.rename(venv)
        else:
            started = time.monotonic()
            reqs = [f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}" for w in wheels]
            install(root, pip_wheel, [WHEEL_CACHE / w["file"] for w in wheels], reqs, self.epoch)
            self.timings[f"install {env}"] = round(time.monotonic() - started, 1)
        stamp.unlink(missing_ok=True)
        if deps is None:
            deps = self._layer(
                deps_key, f"{env} wheels", root, list(walk(root, PREFIX.lstrip("/")))
            )
        before = {p: (root / p).lstat() for p in walk(root, PREFIX.lstrip("/"))}
        install(root, pip_wheel, [self.wheel], [f"{STAGE}/{self.wheel.name}"], self.epoch)
        now = list(walk(root, PREFIX.lstrip("/")))
        new = [p for p in now if p not in before]
        changed = [
            p
            for p in now
            if p in before
            and (root / p).lstat().st_mtime_ns != before[p].st_mtime_ns
            and not (root / p).is_dir()
        ]
        app = self._layer(app_key, f"{env} medforge", root, new + changed)
        smoke(root, SMOKE[env])
        sbom.python(root, bom, self.epoch)
        for p in sorted(new, reverse=True):
            path = root / p
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        shutil.rmtree(parked, ignore_errors=True)
        venv.rename(parked)
        if not changed:
            stamp.write_text(deps_key)
        return deps, app, bom

    def assemble(self, image: Image, layers: list[Layer], rev: str) -> JSON:
        """Write the image's config and manifest; returns the manifest's index entry."""
        created = datetime.fromtimestamp(self.epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ref = f"{repository(image, self.registry)}:{version()}"
        labels = {
            "org.opencontainers.image.title": f"medforge-{image.name}",
            "org.opencontainers.image.description": image.description,
            "org.opencontainers.image.version": version(),
            "org.opencontainers.image.revision": rev,
            "org.opencontainers.image.source": SOURCE,
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.created": created,
        }
        config = {
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "User": f"{UID}:{UID}",
                "Env": [f"{k}={v}" for k, v in config_env(image).items()],
                "Entrypoint": [f"{PREFIX}/bin/{image.entrypoint}"],
                "WorkingDir": HOME,
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
            "history": [
                {"created": created, "created_by": f"medforge images ({n})"}
                for n in _layer_names(image)
            ],
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA,
            "config": write_blob(self.blobs, canonical(config), CONFIG_MEDIA),
            "layers": [la.descriptor() for la in layers],
            "annotations": {
                k: labels[k]
                for k in (
                    "org.opencontainers.image.version",
                    "org.opencontainers.image.revision",
                    "org.opencontainers.image.created",
                )
            },
        }
        entry = write_blob(self.blobs, canonical(manifest), MANIFEST_MEDIA)
        entry["annotations"] = {
            "org.opencontainers.image.ref.name": ref,
            "io.containerd.image.name": ref,
        }
        return entry

    def prune(self, manifests: list[JSON]) -> None:
        """Remove blobs no image of this build refers to."""
        keep = set()
        for m in manifests:
            keep.add(m["digest"])
            doc = json.loads((self.blobs / m["digest"].removeprefix("sha256:")).read_bytes())
            keep.add(doc["config"]["digest"])
            keep.update(la["digest"] for la in doc["layers"])
        for blob in self.blobs.iterdir():
            if f"sha256:{blob.name}" not in keep:
                blob.unlink()


def single_layout(layout: Path, entry: JSON, dest: Path) -> None:
    """A layout holding one image (blobs hard-linked from the shared one), for tools that
    push a whole layout: `crane push build/images/operator REF`."""
    shutil.rmtree(dest, ignore_errors=True)
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / entry["digest"].removeprefix("sha256:")).read_bytes())
    digests = [
        entry["digest"],
        manifest["config"]["digest"],
        *(la["digest"] for la in manifest["layers"]),
    ]
    (dest / "blobs" / "sha256").mkdir(parents=True)
    for digest in digests:
        name = digest.removeprefix("sha256:")
        (dest / "blobs" / "sha256" / name).hardlink_to(blobs / name)
    write_index(dest, [entry])


def _layer_names(image: Image) -> list[str]:
    names = ["debian base", f"{image.environment} wheels", "medforge"]
    return [*names, "toolchain"] if image.toolchain else names


def build(out: Path, registry: str, selected: list[Image]) -> JSON:
    b = Builder(out, registry)
    rev = revision()
    summary: JSON = {"images": {}, "timings": b.timings}
    manifests = []
    for image in selected:
        started = time.monotonic()
        deps, app, python_bom = b.environment(image.environment)
        layers = [b.base(), deps, app, *([b.toolchain()] if image.toolchain else [])]
        entry = b.assemble(image, layers, rev)
        manifests.append(entry)
        pins = lock.read_debian("toolchain" if image.toolchain else "base")
        sbom.image(out / f"{image.name}.cdx.json", image, entry, pins, python_bom, b.epoch)
        summary["images"][image.name] = {
            "reference": entry["annotations"]["io.containerd.image.name"],
            "digest": entry["digest"],
            "compressedBytes": sum(la.size for la in layers),
            "layers": [la.digest for la in layers],
        }
        b.timings[f"image {image.name}"] = round(time.monotonic() - started, 1)
    write_index(b.layout, manifests)
    b.prune(manifests)
    for image, entry in zip(selected, manifests, strict=True):
        single_layout(b.layout, entry, out / image.name)
    summary["checks"] = checks.run(b.layout, selected, b.cache)
    (out / "images.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "images")
    parser.add_argument("--registry", default="ghcr.io/medforge")
    parser.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    parser.add_argument("images", nargs="*", choices=[[], *[i.name for i in IMAGES]], default=[])
    args = parser.parse_args()
    if args.no_cache:
        shutil.rmtree(args.out, ignore_errors=True)
    selected = [i for i in IMAGES if not args.images or i.name in args.images]
    started = time.monotonic()
    try:
        summary = build(args.out, args.registry, selected)
    except rootfs.BuildError as exc:
        raise SystemExit(f"make images: {exc}") from None
    for info in summary["images"].values():
        print(f"{info['reference']}  {info['digest']}  {info['compressedBytes'] / 1e6:.0f} MB")
    print(f"built in {time.monotonic() - started:.0f} s; SBOMs and images.json in {args.out}")


if __name__ == "__main__":
    main()
