"""The merge's inputs, read as untrusted: each fetched manifest first (capped, checked against
the announced digest), then only the files its manifest lists, never more bytes than it says;
verified, then screened against the base model and its task before any merge. Whatever one input
gets wrong is a verdict on that input (excluded, with its reason), never a failure of the merge;
only the store failing is a fault (StoreFault), which no input explains."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medforge_common.api import InputState
from medforge_common.artifacts import MANIFEST_FILE
from medforge_common.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    check_safe_name,
    digest_of,
)
from medforge_common.redact import redact
from medforge_merger.adapters import Adapter, InputRejected, check_compatible, load_adapter
from medforge_ml import transfers

if TYPE_CHECKING:
    from medforge_merger.config import MergeConfig
    from medforge_merger.scoring import Scorer

JSON = dict[str, Any]
Loaded = list[tuple[Adapter, float, JSON]]  # (adapter, fixed weight, its entry in the result)
# No contribution the trainer makes comes near this (an adapter and a distilled set of at most
# 1,000 images per class); it bounds the disk one input can fill.
MAX_INPUT_BYTES = 16 << 30


class StoreFault(Exception):
    """The store could not be read or written: the revision is retried, nobody is blamed."""


def fetch(spec: JSON, dest: Path, max_bytes: int | None = None) -> Path:
    """One file, from a presigned URL or a local path, streamed to disk; with `max_bytes`,
    a larger object is refused (InputRejected) after at most that many bytes."""
    check_safe_name(spec["name"])  # pickle formats are refused before a byte is read
    target: Path = dest / str(spec["name"])
    if "path" in spec:
        src = Path(spec["path"])
        if max_bytes is not None and src.stat().st_size > max_bytes:
            raise InputRejected(f"{spec['name']}: larger than the {max_bytes} bytes expected")
        shutil.copyfile(src, target)
        return target
    try:
        transfers.download(spec["url"], target, spec["name"], max_bytes=max_bytes)
    except transfers.TooLarge as exc:
        raise InputRejected(str(exc)) from exc
    except transfers.StoreError as exc:
        raise StoreFault(f"cannot fetch an input: {exc}") from exc
    return target


def fetch_artifact(item: JSON, dest: Path) -> None:
    """An artifact's manifest (at most MAX_MANIFEST_BYTES, its digest the announced one), then
    each file it lists, capped at the size it states. Files given but not listed are not read."""
    given = {f["name"]: f for f in item["files"]}
    for name in given:
        check_safe_name(name)  # pickle formats are refused before a byte is read
    if MANIFEST_FILE not in given:
        raise InputRejected(f"no {MANIFEST_FILE} among its files")
    raw = fetch(given[MANIFEST_FILE], dest, MAX_MANIFEST_BYTES).read_bytes()
    actual = digest_of(raw)
    if actual != item["digest"]:
        raise InputRejected(
            f"manifest.json digest {actual[:19]}... is not the announced {item['digest'][:19]}..."
        )
    try:
        manifest = Manifest.from_json(raw.decode(), f"{item.get('name', 'input')}/manifest.json")
    except UnicodeDecodeError as exc:
        raise InputRejected(f"manifest.json is not UTF-8 ({exc})") from exc
    total = sum(e.size for e in manifest.files)
    if total > MAX_INPUT_BYTES:
        raise InputRejected(f"its files add up to {total} bytes, more than {MAX_INPUT_BYTES}")
    for entry in manifest.files:
        if entry.name not in given:
            raise InputRejected(f"{entry.name}: listed in its manifest but not given")
        fetch(given[entry.name], dest, entry.size)


def weight_for(item: JSON, weights: JSON) -> float:
    """spec.strategy.weights is keyed by namespace/name or by name; unnamed inputs weigh 1."""
    for key in (f"{item['namespace']}/{item['name']}", item["name"]):
        if key in weights:
            return float(weights[key])
    return 1.0


def exclude(report: list[JSON], entry: JSON, reason: str, code: str = "") -> None:
    report.append(
        entry | {"state": InputState.EXCLUDED, "reason": reason, **({"code": code} if code else {})}
    )
    print(f"excluded {entry['namespace']}/{entry['name']}: {reason}", flush=True)


def read_inputs(cfg: MergeConfig, work: Path, report: list[JSON], scorer: Scorer | None) -> Loaded:
    """Every input fetched, verified and screened alone; those that fail go to the report,
    excluded with their reason. Inputs are screened in the order of their names, so that two
    hospitals with the same task get the same task names in every revision."""
    read: Loaded = []
    for i, item in enumerate(cfg.inputs):
        key = f"{item['namespace']}/{item['name']}".lstrip("/")
        entry = {"namespace": item["namespace"], "name": item["name"], "digest": item["digest"]}
        if item.get("new") is False:
            entry["new"] = False  # merged before (a full revision): never blamed for a regression
        if isinstance(item.get("parent"), dict):  # trained from a revision: merged relative to it
            entry["parent"] = {k: item["parent"][k] for k in ("revision", "digest", "stale")}
        granted = item.get("privacy")
        if isinstance(granted, dict):  # the operator's ledger: the revision's manifest keeps it
            entry["privacy"] = {k: granted[k] for k in ("epsilon", "delta") if k in granted}
        d = work / f"input-{i}"
        d.mkdir()
        try:
            fetch_artifact(item, d)
            ad = load_adapter(d, key, item["digest"], cfg.base_digest)
        except (InputRejected, ManifestError, OSError, KeyError) as exc:
            exclude(report, entry, redact(str(exc)))
            continue
        read.append((ad, weight_for(item, cfg.weights), entry))
    if scorer is None:
        return read
    taken = {t.name for t in scorer.tasks}
    refused: set[str] = set()
    for ad, _, entry in sorted(read, key=lambda r: r[0].key):
        try:
            scorer.screen(ad, taken)
        except InputRejected as exc:
            exclude(report, entry, redact(str(exc)))
            refused.add(ad.key)
    return [r for r in read if r[0].key not in refused]


def compatible(loaded: Loaded, current: Adapter | None, report: list[JSON]) -> Loaded:
    """The inputs that fit together (and the current revision): outliers and clashing shapes
    are excluded into the report. The outlier test is for contributions only: a composite's
    norm grows with every revision."""
    _, rejected = check_compatible([a for a, _, _ in loaded])
    if current is not None:
        for ad, _, _ in loaded:
            clash = next(
                (
                    m
                    for m, (d_, _, k_) in current.shapes.items()
                    if m in ad.shapes and (ad.shapes[m][0], ad.shapes[m][2]) != (d_, k_)
                ),
                None,
            )
            if clash and ad.key not in rejected:
                rejected[ad.key] = f"target module {clash} does not fit the current revision's"
    for ad, _, entry in loaded:
        if entry.get("new") is False:
            rejected.pop(ad.key, None)  # newcomers never get a member merged before excluded
        if ad.key in rejected:
            exclude(report, entry, rejected[ad.key])
    return [(a, w, e) for a, w, e in loaded if a.key not in rejected]
