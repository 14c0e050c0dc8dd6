"""`medforge-merge`: job config in, verified inputs, a streamed merge, the composite and its
manifest out (presigned PUT URLs, or a directory by hand), the result JSON in the
termination message. Any failure: non-zero exit and a one-line reason there."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from medforge_common.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    check_safe_name,
    sha256_file,
)
from medforge_common.result import DEFAULT_PATH, encode_result, failure_line
from medforge_merger.adapters import (
    ADAPTER_FILE,
    Adapter,
    InputRejected,
    check_compatible,
    load_adapter,
)
from medforge_merger.merge import Strategy, merge_to_file
from medforge_merger.strategies import MergeError

JSON = dict[str, Any]
VERSION = "0.1.0"


class JobFailed(Exception):
    pass


def fetch(spec: JSON, dest: Path) -> None:
    """One input file, from a presigned URL or a local path, streamed to disk."""
    check_safe_name(spec["name"])  # pickle formats are refused before a byte is read
    target = dest / spec["name"]
    if "path" in spec:
        shutil.copyfile(spec["path"], target)
        return
    with urllib.request.urlopen(spec["url"], timeout=60) as r, target.open("wb") as out:  # noqa: S310
        shutil.copyfileobj(r, out, 1 << 20)


def put(url_or_path: str, source: Path) -> None:
    if url_or_path.startswith(("http://", "https://")):
        req = urllib.request.Request(url_or_path, data=source.read_bytes(), method="PUT")  # noqa: S310
        with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310
            if r.status not in (200, 201):
                raise JobFailed(f"upload of {source.name} answered HTTP {r.status}")
    else:
        shutil.copyfile(source, url_or_path)


def weight_for(item: JSON, weights: JSON) -> float:
    """spec.strategy.weights is keyed by namespace/name or by name; unnamed inputs weigh 1."""
    for key in (f"{item['namespace']}/{item['name']}", item["name"]):
        if key in weights:
            return float(weights[key])
    return 1.0


def run(cfg: JSON, work: Path, output_dir: Path | None) -> JSON:
    base_digest = cfg["baseModel"]["digest"]
    strat = cfg.get("strategy") or {}
    s = Strategy(
        strat.get("type", "linear"),
        strat.get("rank"),
        float(strat.get("density", 1.0)),
        int((strat.get("search") or {}).get("seed", 0)),
    )
    report: list[JSON] = []
    loaded: list[tuple[Adapter, float, JSON]] = []
    items = list(cfg.get("inputs") or [])
    if cfg.get("current"):
        cur = cfg["current"]
        items.insert(
            0,
            {
                "namespace": "",
                "name": f"revision-{cur['revision']}",
                "digest": cur["digest"],
                "files": cur["files"],
                "current": True,
            },
        )
    for i, item in enumerate(items):
        key = f"{item['namespace']}/{item['name']}".lstrip("/")
        entry = {"namespace": item["namespace"], "name": item["name"], "digest": item["digest"]}
        d = work / f"input-{i}"
        d.mkdir()
        try:
            for f in item["files"]:
                fetch(f, d)
            ad = load_adapter(d, key, item["digest"], base_digest)
        except (InputRejected, ManifestError, OSError) as exc:
            if item.get("current"):
                raise JobFailed(f"the current revision cannot be read: {exc}") from exc
            report.append(entry | {"state": "Excluded", "reason": str(exc)})
            print(f"excluded {key}: {exc}", flush=True)
            continue
        w = 1.0 if item.get("current") else weight_for(item, strat.get("weights") or {})
        loaded.append((ad, w, entry | {"current": bool(item.get("current"))}))
    _, rejected = check_compatible([a for a, _, _ in loaded])
    for ad, _, entry in loaded:
        if ad.key in rejected:
            report.append(
                {k: v for k, v in entry.items() if k != "current"}
                | {"state": "Excluded", "reason": rejected[ad.key]}
            )
    use = [(a, w, e) for a, w, e in loaded if a.key not in rejected]
    if not any(not e["current"] for _, _, e in use):
        raise JobFailed(
            "no input passed verification: " + "; ".join(r.get("reason", "") for r in report)
        )
    composite = work / ADAPTER_FILE
    t0 = time.monotonic()
    rank = merge_to_file([a for a, _, _ in use], [w for _, w, _ in use], s, composite)
    print(f"merged {len(use)} input(s) with {s.type} in {time.monotonic() - t0:.2f} s", flush=True)
    included = [
        {k: v for k, v in e.items() if k != "current"} | {"state": "Included", "coefficient": w}
        for _, w, e in use
        if not e["current"]
    ]
    digest, size = sha256_file(composite)
    manifest = Manifest(
        "composite",
        base_digest,
        [FileEntry(ADAPTER_FILE, digest, size)],
        {
            "strategy": s.type,
            "scale": 1.0,  # folded into the B factors
            "maxRank": rank or None,
            "density": s.density,
            "seed": s.seed,
            "integration": cfg.get("integration", "full"),
            "inputs": included,
            "tool": f"medforge-merge {VERSION}",
        },
    )
    manifest_path = work / "manifest.json"
    manifest_path.write_text(manifest.to_json())
    outputs = (cfg.get("output") or {}).get("files") or {}
    for name, path in ((ADAPTER_FILE, composite), ("manifest.json", manifest_path)):
        if output_dir is not None:
            put(str(output_dir / name), path)
        elif name in outputs:
            put(outputs[name], path)
        else:
            raise JobFailed(f"the job config has no output URL for {name}")
    return {
        "artifact": {
            "uri": (cfg.get("output") or {}).get("uri", str(output_dir)),
            "digest": "sha256:" + hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
            "sizeBytes": size,
        },
        "inputs": included + report,
        "metrics": {},
        "regression": {},
        "integration": cfg.get("integration", "full"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medforge-merge", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="job config JSON file (default: $MEDFORGE_JOB_CONFIG)")
    p.add_argument("--output-dir", help="write the composite here instead of the config's URLs")
    p.add_argument(
        "--termination-log", default=os.environ.get("MEDFORGE_TERMINATION_LOG", str(DEFAULT_PATH))
    )
    args = p.parse_args(argv)
    term = Path(args.termination_log)

    def finish(text: str, code: int) -> int:
        # Run by hand there may be no termination-message path: stdout says it all.
        with contextlib.suppress(OSError):
            term.write_text(text)
        print(text, file=sys.stdout if code == 0 else sys.stderr)
        return code

    try:
        raw = Path(args.config).read_text() if args.config else os.environ["MEDFORGE_JOB_CONFIG"]
        cfg = json.loads(raw)
    except (KeyError, OSError, json.JSONDecodeError) as exc:
        return finish(
            failure_line(
                f"no readable job config ({exc}); pass --config or set MEDFORGE_JOB_CONFIG"
            ),
            2,
        )
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medforge-merge-") as tmp:
        try:
            result = run(cfg, Path(tmp), out_dir)
        except (JobFailed, MergeError, ManifestError, KeyError) as exc:
            return finish(failure_line(f"merge failed: {exc}"), 1)
        except MemoryError:
            return finish(
                failure_line("merge failed: out of memory; give the merge Job more memory"), 1
            )
    return finish(encode_result(result), 0)


if __name__ == "__main__":
    sys.exit(main())
