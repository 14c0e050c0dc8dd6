"""The image builder's layers and the kubelet's image store, on small trees: same tree, same
digest; setuid bits never packed; whiteouts for deletions; references resolved as a kubelet
does; layers that try to escape their root refused."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tomllib
from pathlib import Path

import pytest

from medforge_localcluster import ocistore
from tools.images import layer

EPOCH = 1767225600


def _tree(root: Path) -> Path:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("#!/bin/sh\n")
    (root / "usr/bin/tool").chmod(0o4755)
    (root / "etc").mkdir()
    (root / "etc/config").write_text("a=1\n")
    (root / "etc/link").symlink_to("config")
    os.link(root / "etc/config", root / "etc/hard")
    return root


def test_the_same_tree_packs_to_the_same_digest_whatever_its_file_times(tmp_path: Path) -> None:
    a = layer.write_layer(
        _tree(tmp_path / "a"), layer.walk(tmp_path / "a"), tmp_path / "blobs", EPOCH
    )
    b_root = _tree(tmp_path / "b")
    os.utime(b_root / "etc/config", (1, 1))
    b = layer.write_layer(b_root, layer.walk(b_root), tmp_path / "blobs", EPOCH)
    assert a == b and a.digest != a.diff_id
    with tarfile.open(tmp_path / "blobs" / a.digest.removeprefix("sha256:")) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["usr/bin/tool"].mode == 0o755  # setuid cleared
    assert {m.mtime for m in members.values()} == {EPOCH}
    assert members["etc/hard"].islnk() and members["etc/link"].issym()
    assert list(members) == sorted(members)


def test_a_diff_packs_what_changed_and_whites_out_what_went(tmp_path: Path) -> None:
    lower = _tree(tmp_path / "lower")
    upper = _tree(tmp_path / "upper")
    (upper / "etc/config").write_text("a=2\n")
    (upper / "usr/bin/tool").unlink()
    (upper / "opt").mkdir()
    (upper / "opt/new").write_text("x")
    changed, deleted = layer.diff(lower, upper)
    assert "etc/config" in changed and "opt/new" in changed and "etc/link" not in changed
    assert deleted == ["usr/bin/tool"]
    la = layer.write_layer(upper, changed, tmp_path / "blobs", EPOCH, deleted)
    with tarfile.open(tmp_path / "blobs" / la.digest.removeprefix("sha256:")) as tar:
        assert "usr/bin/.wh.tool" in tar.getnames()


def _layout(tmp_path: Path, layers: list[layer.Layer], ref: str) -> Path:
    layout = tmp_path / "oci"
    blobs = layout / "blobs" / "sha256"
    config = {
        "config": {"User": "10001:10001", "Entrypoint": ["/usr/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
    }
    manifest = {
        "schemaVersion": 2,
        "config": layer.write_blob(blobs, layer.canonical(config), layer.CONFIG_MEDIA),
        "layers": [la.descriptor() for la in layers],
    }
    entry = layer.write_blob(blobs, layer.canonical(manifest), layer.MANIFEST_MEDIA)
    entry["annotations"] = {"io.containerd.image.name": ref}
    layer.write_index(layout, [entry])
    return layout


def test_the_store_resolves_references_and_unpacks_layers_for_overlay(tmp_path: Path) -> None:
    blobs = tmp_path / "oci" / "blobs" / "sha256"
    lower = _tree(tmp_path / "lower")
    base = layer.write_layer(lower, layer.walk(lower), blobs, EPOCH)
    upper = _tree(tmp_path / "upper")
    (upper / "etc/config").unlink()
    changed, deleted = layer.diff(lower, upper)
    top = layer.write_layer(upper, changed, blobs, EPOCH, deleted)
    layout = _layout(tmp_path, [base, top], "example.org/team/tool:1.0")
    store = ocistore.Store(layout, tmp_path / "cache")
    image = store.resolve("example.org/team/tool:1.0")
    assert image.config["User"] == "10001:10001"
    assert store.resolve(f"anything@{image.digest}").digest == image.digest
    with pytest.raises(ocistore.ImageError, match="make images"):
        store.resolve("example.org/team/tool:2.0")
    top_dir, base_dir = store.unpacked(image)
    assert (base_dir / "etc/config").read_text() == "a=1\n"
    gone = os.lstat(top_dir / "etc/config")
    assert os.major(gone.st_rdev) == 0 and os.minor(gone.st_rdev) == 0  # overlay's whiteout
    assert os.stat(base_dir / "usr/bin/tool").st_mode & 0o7777 == 0o755


def test_references_normalise_as_a_kubelet_reads_them() -> None:
    assert ocistore.normalise("busybox") == ("docker.io/library/busybox:latest", "")
    assert ocistore.normalise("ghcr.io/medforge/operator:0.1.0") == (
        "ghcr.io/medforge/operator:0.1.0",
        "",
    )
    assert ocistore.normalise("localhost:5000/x@sha256:ab") == (
        "localhost:5000/x:latest",
        "sha256:ab",
    )


def _evil_layout(
    tmp_path: Path, entries: list[tarfile.TarInfo]
) -> tuple[ocistore.Store, ocistore.Image]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    data = raw.getvalue()
    import hashlib

    blobs = tmp_path / "oci" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    gz = gzip.compress(data, mtime=0)
    digest = hashlib.sha256(gz).hexdigest()
    (blobs / digest).write_bytes(gz)
    la = layer.Layer(f"sha256:{digest}", f"sha256:{hashlib.sha256(data).hexdigest()}", len(gz))
    store = ocistore.Store(_layout(tmp_path, [la], "example.org/evil:1"), tmp_path / "cache")
    return store, store.resolve("example.org/evil:1")


def test_a_layer_that_writes_through_a_link_out_of_its_root_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("etc")
    link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "outside")
    (tmp_path / "outside").mkdir()
    payload = tarfile.TarInfo("etc/passwd")
    payload.size = 1
    store, image = _evil_layout(tmp_path, [link, payload])
    with pytest.raises(ocistore.ImageError, match="outside"):
        store.unpacked(image)
    assert not (tmp_path / "outside" / "passwd").exists()


def test_every_package_directory_is_in_the_distribution() -> None:
    """A subpackage missing from pyproject's list is missing from the wheel, hence from the
    images (the operator image once lacked medforge_operator.composite)."""
    root = Path(__file__).resolve().parents[2]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for name, where in tool["package-dir"].items():
        for init in (root / where).rglob("__init__.py"):
            rel = init.parent.relative_to(root / where)
            found.add(".".join([name, *rel.parts]))
    assert found == listed
