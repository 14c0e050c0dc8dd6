"""`medforge-merge` run by hand on adapters on disk: verification before any math, exact
results, and a one-line reason on failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medforge_common.manifest import digest_of
from medforge_merger.adapters import StreamingWriter
from tests.merge_helpers import BASE, MODULES, dense, files, full_result, make_adapter


def run_merge(tmp: Path, cfg: dict[str, Any], out: str = "out") -> tuple[int, str, Path]:
    (tmp / "job.json").write_text(json.dumps(cfg))
    term = tmp / "termination-log"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medforge_merger",
            "--config",
            str(tmp / "job.json"),
            "--output-dir",
            str(tmp / out),
            "--termination-log",
            str(term),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, term.read_text(), tmp / out


def config(inputs: list[dict[str, Any]], **strategy: Any) -> dict[str, Any]:
    return {
        "kind": "merge",
        "baseModel": {"digest": BASE, "files": []},
        "integration": "full",
        "strategy": {"type": "linear", **strategy},
        "inputs": inputs,
    }


def entry(name: str, digest: str, directory: Path) -> dict[str, Any]:
    return {"namespace": "h", "name": name, "digest": digest, "files": files(directory)}


def load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_linear_merge_of_mixed_ranks_is_exact(tmp_path: Path) -> None:
    specs = [(4, 1, 8.0), (8, 2, 16.0), (16, 3, 16.0)]
    made = [
        make_adapter(tmp_path / f"a{i}", r, seed, alpha) for i, (r, seed, alpha) in enumerate(specs)
    ]
    weights = {"h/a0": 0.5, "a1": -1.0}  # by namespace/name and by name; a2 gets 1
    cfg = config(
        [entry(f"a{i}", d, tmp_path / f"a{i}") for i, (d, _) in enumerate(made)], weights=weights
    )
    code, term, out = run_merge(tmp_path, cfg)
    assert code == 0, term
    result = full_result(term, out)
    assert [i["coefficient"] for i in result["inputs"]] == [0.5, -1.0, 1.0]
    merged = load(out / "adapter.safetensors")
    for m in MODULES:
        ref = torch.stack(
            [
                w * dense(t, m, alpha / r)
                for (_, t), (r, _, alpha), w in zip(made, specs, [0.5, -1.0, 1.0], strict=True)
            ]
        ).sum(0)
        ours = merged[f"{m}.lora_B.weight"].double() @ merged[f"{m}.lora_A.weight"].double()
        assert merged[f"{m}.lora_A.weight"].shape[0] == 28  # cat of ranks 4 + 8 + 16
        assert rel(ours, ref) < 1e-5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["meta"]["strategy"] == "linear" and manifest["base_model_digest"] == BASE


def test_svd_merge_is_the_best_low_rank_approximation(tmp_path: Path) -> None:
    made = [make_adapter(tmp_path / f"a{i}", r, i) for i, r in enumerate([4, 8, 16])]
    cfg = config(
        [entry(f"a{i}", d, tmp_path / f"a{i}") for i, (d, _) in enumerate(made)], type="svd", rank=6
    )
    code, term, out = run_merge(tmp_path, cfg)
    assert code == 0, term
    merged = load(out / "adapter.safetensors")
    for m in MODULES:
        ref = torch.stack(
            [dense(t, m, 16.0 / r) for (_, t), r in zip(made, [4, 8, 16], strict=True)]
        ).sum(0)
        u, s, vh = torch.linalg.svd(ref)
        best = (u[:, :6] * s[:6]) @ vh[:6]
        ours = merged[f"{m}.lora_B.weight"].double() @ merged[f"{m}.lora_A.weight"].double()
        assert merged[f"{m}.lora_A.weight"].shape == (6, ref.shape[1])
        assert rel(ours, best) < 1e-4  # float32 storage


def test_bad_inputs_are_excluded_with_reasons_and_the_merge_goes_on(tmp_path: Path) -> None:
    good = [make_adapter(tmp_path / f"good{i}", 4, i) for i in range(2)]
    inputs = [entry(f"good{i}", d, tmp_path / f"good{i}") for i, (d, _) in enumerate(good)]

    d_corrupt, _ = make_adapter(tmp_path / "corrupt", 4, 10)
    raw = bytearray((tmp_path / "corrupt" / "adapter.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "corrupt" / "adapter.safetensors").write_bytes(bytes(raw))
    inputs.append(entry("corrupt", d_corrupt, tmp_path / "corrupt"))

    d_other, _ = make_adapter(tmp_path / "other", 4, 11, base="sha256:" + "c" * 64)
    inputs.append(entry("other", d_other, tmp_path / "other"))

    d_nan, t_nan = make_adapter(tmp_path / "nan", 4, 12)
    t_nan[f"{MODULES[0]}.lora_A.weight"][0, 0] = float("nan")
    save_file(t_nan, str(tmp_path / "nan" / "adapter.safetensors"))
    from medforge_common.manifest import Manifest, digest_of

    m = Manifest("contribution", BASE, meta={"rank": 4, "alpha": 16})
    m.add_file(tmp_path / "nan" / "adapter.safetensors")
    (tmp_path / "nan" / "manifest.json").write_text(m.to_json())

    d_nan = digest_of((tmp_path / "nan" / "manifest.json").read_bytes())
    inputs.append(entry("nan", d_nan, tmp_path / "nan"))

    d_wide, _ = make_adapter(tmp_path / "wide", 4, 13, d=40)
    inputs.append(entry("wide", d_wide, tmp_path / "wide"))

    inputs.append(
        {
            "namespace": "h",
            "name": "pickled",
            "digest": d_other,
            "files": [
                {"name": "adapter.bin", "path": str(tmp_path / "good0" / "adapter.safetensors")}
            ],
        }
    )
    inputs.append(
        {**entry("lying", good[0][0], tmp_path / "other")}
    )  # announced digest != manifest

    code, term, out = run_merge(tmp_path, config(inputs))
    assert code == 0, term
    reasons = {i["name"]: i.get("reason", "") for i in full_result(term, out)["inputs"]}
    states = {i["name"]: i["state"] for i in full_result(term, out)["inputs"]}
    assert states == {
        "good0": "Included",
        "good1": "Included",
        "corrupt": "Excluded",
        "other": "Excluded",
        "nan": "Excluded",
        "wide": "Excluded",
        "pickled": "Excluded",
        "lying": "Excluded",
    }
    assert "adapter.safetensors: sha256" in reasons["corrupt"]
    assert "trained for base model" in reasons["other"]
    assert "NaN or Inf" in reasons["nan"]
    assert "incompatible target module" in reasons["wide"]
    assert "pickle" in reasons["pickled"] and "safetensors" in reasons["pickled"]
    assert "digest" in reasons["lying"]


def test_no_usable_input_is_a_verdict_on_one_line(tmp_path: Path) -> None:
    """Every input refused: a verdict (exit 3, not retried), one JSON line naming it, and the
    per-input report in result.json."""
    d, _ = make_adapter(tmp_path / "other", 4, 1, base="sha256:" + "c" * 64)
    code, term, out = run_merge(tmp_path, config([entry("other", d, tmp_path / "other")]))
    assert code == 3 and "\n" not in term
    line = json.loads(term)
    assert line["verdict"] == "NoUsableInput"
    assert line["message"].startswith("no input passed verification")
    report = json.loads((out / "result.json").read_text())
    assert (
        report["inputs"][0]["state"] == "Excluded" and "base model" in report["inputs"][0]["reason"]
    )
    assert not (out / "adapter.safetensors").exists()


def test_searched_strategies_need_the_base_model(tmp_path: Path) -> None:
    d, _ = make_adapter(tmp_path / "a", 4, 1)
    code, term, _ = run_merge(tmp_path, config([entry("a", d, tmp_path / "a")], type="fusion"))
    assert code == 1 and "fusion searches on the base model: baseModel.files is empty" in term


def test_incremental_merge_adds_to_the_current_revision(tmp_path: Path) -> None:
    first = [make_adapter(tmp_path / f"a{i}", 4, i) for i in range(2)]
    code, term, rev1 = run_merge(
        tmp_path,
        config([entry(f"a{i}", d, tmp_path / f"a{i}") for i, (d, _) in enumerate(first)]),
        "rev1",
    )
    assert code == 0, term
    new_digest, new = make_adapter(tmp_path / "late", 8, 7)
    cfg = config([entry("late", new_digest, tmp_path / "late")])
    cfg["integration"] = "incremental"
    cfg["current"] = {
        "revision": 1,
        "digest": json.loads(term)["artifact"]["digest"],
        "files": files(rev1),
    }
    code, term, rev2 = run_merge(tmp_path, cfg, "rev2")
    assert code == 0, term
    merged = load(rev2 / "adapter.safetensors")
    for m in MODULES:
        ref = sum(dense(t, m, 4.0) for _, t in first) + dense(new, m, 2.0)
        ours = merged[f"{m}.lora_B.weight"].double() @ merged[f"{m}.lora_A.weight"].double()
        assert rel(ours, ref) < 1e-5


def test_streaming_writer_round_trips_and_aborts_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    w = StreamingWriter(path, [("a", (2, 3)), ("b", (4,))])
    w.write("a", np.arange(6.0).reshape(2, 3))
    w.write("b", np.ones(4))
    w.close()
    got = load(path)
    assert torch.equal(got["a"], torch.arange(6.0).reshape(2, 3)) and torch.equal(
        got["b"], torch.ones(4)
    )
    w = StreamingWriter(path, [("a", (2, 3))])
    w.abort()
    assert not path.exists()  # nothing half-written is left


def test_a_merge_that_overflows_uploads_nothing(tmp_path: Path) -> None:
    """Finite inputs can still merge into Inf (a weight past float32's range): the output is
    checked before the first upload."""
    d, _ = make_adapter(tmp_path / "a", 4, 1)
    cfg = config([entry("a", d, tmp_path / "a")], weights={"h/a": 1e39})
    code, term, out = run_merge(tmp_path, cfg)
    assert code == 1 and "holds NaN or Inf" in term and "nothing was uploaded" in term, term
    assert not (out / "adapter.safetensors").exists() and not (out / "manifest.json").exists()


def poisoned(directory: Path, seed: int, **meta: Any) -> str:
    """An adapter whose manifest meta a tenant edited (the digest matches the edit)."""

    from medforge_common.manifest import Manifest

    make_adapter(directory, 4, seed)
    manifest = Manifest.from_json((directory / "manifest.json").read_text())
    manifest.meta |= meta
    body = manifest.to_json().encode()
    (directory / "manifest.json").write_bytes(body)
    return digest_of(body)


def test_poisoned_metadata_excludes_only_that_input(tmp_path: Path) -> None:
    good, _ = make_adapter(tmp_path / "good", 4, 1)
    inputs = [entry("good", good, tmp_path / "good")]
    for name, meta in (
        ("string-rank", {"rank": "four"}),
        ("nan-alpha", {"alpha": float("nan")}),
        ("huge-rank", {"rank": 10**9}),
        ("bool-alpha", {"alpha": True}),
    ):
        inputs.append(entry(name, poisoned(tmp_path / name, 2, **meta), tmp_path / name))
    code, term, out = run_merge(tmp_path, config(inputs))
    assert code == 0, term
    result = full_result(term, out)
    states = {i["name"]: (i["state"], i.get("reason", "")) for i in result["inputs"]}
    assert states["good"][0] == "Included"
    for name in ("string-rank", "nan-alpha", "huge-rank", "bool-alpha"):
        assert states[name][0] == "Excluded" and "manifest meta." in states[name][1], states


def test_a_contributions_own_scale_is_ignored(tmp_path: Path) -> None:
    """Only composites (merged by medforge-merge) carry a scale; a contribution claiming one
    weighs alpha / rank like every other."""
    plain, _ = make_adapter(tmp_path / "plain", 4, 3)
    boosted = poisoned(tmp_path / "boosted", 3, scale=1e6)
    outs = []
    for name, digest in (("plain", plain), ("boosted", boosted)):
        code, term, out = run_merge(
            tmp_path, config([entry(name, digest, tmp_path / name)]), out=f"out-{name}"
        )
        assert code == 0, term
        outs.append(load(out / "adapter.safetensors"))
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_a_thousand_inputs_report_through_a_small_message(tmp_path: Path) -> None:
    """A full merge of 1,000 inputs: the result (every input's entry) goes to result.json, the
    termination message stays small; a broken input among them is reported, not fatal."""
    inputs = []
    for i in range(1000):
        d, _ = make_adapter(tmp_path / f"a{i}", 2, i, modules=MODULES[:1], d=4)
        inputs.append(entry(f"site-{i:04d}", d, tmp_path / f"a{i}"))
    inputs[500]["digest"] = "sha256:" + "0" * 64  # announced wrong: excluded, the rest merge
    code, term, out = run_merge(tmp_path, config(inputs))
    assert code == 0, term
    assert len(term.encode()) < 1024
    result = full_result(term, out)
    states = [i["state"] for i in result["inputs"]]
    assert len(states) == 1000 and states.count("Included") == 999
    assert any(i["name"] == "site-0500" and i["state"] == "Excluded" for i in result["inputs"])


def test_subspace_strategies_run_as_jobs_exactly_at_their_scale(tmp_path: Path) -> None:
    """iso-c, iso-cts, tsv and knots-ties through `medforge-merge`: the file holds what the
    factor-space functions give (checked against dense references in test_merge_subspace.py),
    at the fixed scale (no distilled set to search on), padded to the declared rank."""
    from medforge_merger.registry import Strategy, merge_layer
    from medforge_merger.strategies import Factors

    made = [make_adapter(tmp_path / f"a{i}", r, i) for i, r in enumerate([4, 8])]
    inputs = [entry(f"a{i}", d, tmp_path / f"a{i}") for i, (d, _) in enumerate(made)]
    for kind in ("iso-c", "iso-cts", "tsv", "knots-ties", "core-ties"):
        extra = {"density": 0.5} if kind in ("knots-ties", "core-ties") else {}
        code, term, out = run_merge(
            tmp_path, config(inputs, type=kind, scale=0.7, **extra), out=f"out-{kind}"
        )
        assert code == 0, term
        merged = load(out / "adapter.safetensors")
        assert json.loads((out / "manifest.json").read_text())["meta"]["scale"] == 0.7
        for m in MODULES:
            layers = [
                Factors(
                    t[f"{m}.lora_B.weight"].double().numpy() * (16.0 / r),
                    t[f"{m}.lora_A.weight"].double().numpy(),
                )
                for (_, t), r in zip(made, [4, 8], strict=True)
            ]
            want = merge_layer(Strategy(kind, density=0.5, scale=0.7), layers, [1.0, 1.0])
            ours = merged[f"{m}.lora_B.weight"].double() @ merged[f"{m}.lora_A.weight"].double()
            ref = torch.from_numpy(want.B @ want.A)
            assert rel(ours, ref) < 1e-4, kind
            # Padded to the ranks' total (tsv: its share of each, 4 // 2 + 8 // 2).
            assert merged[f"{m}.lora_A.weight"].shape[0] == (6 if kind == "tsv" else 12)


def test_the_merge_process_keeps_freed_memory_on_glibc() -> None:
    """The allocator settings a merge starts with take on this (glibc) machine, and say so
    where they cannot (another C library)."""
    import platform

    from medforge_merger.allocator import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
