"""Reading verified adapters tensor by tensor, and writing a composite without holding it whole.

Adapters use peft's key names: `<module>.lora_A.weight` (r x k) and `<module>.lora_B.weight`
(d x r), with `rank` and `alpha` in the manifest (dW = alpha / rank * B @ A). A composite stores
factor layers the same way with the scale folded in (alpha = rank), and dense layers (TIES, DARE)
as `<module>.delta.weight`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from medforge_common.artifacts import ADAPTER_FILE, MANIFEST_FILE
from medforge_common.manifest import Manifest, ManifestError, digest_of, verify_dir
from medforge_merger.strategies import Factors

SUFFIX_A = ".lora_A.weight"
SUFFIX_B = ".lora_B.weight"
SUFFIX_DELTA = ".delta.weight"
# An input whose total update norm exceeds this multiple of the median input's is flagged.
OUTLIER_FACTOR = 25.0


class InputRejected(Exception):
    """An input that must not be merged; the message says why."""


@dataclass
class Adapter:
    """A verified adapter: where it is, and the shape of each adapted module."""

    key: str  # namespace/name, for messages
    digest: str
    path: Path
    scale: float
    shapes: dict[str, tuple[int, int, int]]  # module -> (d, r, k)
    task: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    norm: float = 0.0
    # Its task (a tasks.Task: distilled set, classes, head, own score), once screened; None
    # when it carries no distilled set.
    distilled: Any = None
    screened: bool = False

    def factors(self, module: str) -> Factors:
        """One module's factors (scale folded into B), read on demand in float32 (numpy)."""
        with safe_open(str(self.path), framework="np") as f:
            a = f.get_tensor(module + SUFFIX_A).astype(np.float32, copy=False)
            b = f.get_tensor(module + SUFFIX_B).astype(np.float32, copy=False)
        return Factors(b * np.float32(self.scale), a)


def _check_pair(m: str, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise InputRejected(f"{m}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputRejected(f"{m}: NaN or Inf values")


def _read_factors(path: Path) -> tuple[dict[str, tuple[int, int, int]], float]:
    """Every module's (d_out, r, d_in) and the update's squared norm, each LoRA pair checked:
    only A/B tensors, in pairs that multiply, finite."""
    shapes: dict[str, tuple[int, int, int]] = {}
    sq_norm = 0.0
    try:
        with safe_open(str(path), framework="np") as f:
            keys = set(f.keys())
            modules = sorted({k[: -len(SUFFIX_A)] for k in keys if k.endswith(SUFFIX_A)})
            stray = sorted(k for k in keys if not k.endswith((SUFFIX_A, SUFFIX_B)))
            if stray:
                raise InputRejected(f"{ADAPTER_FILE} holds non-LoRA tensors ({stray[0]}, ...)")
            if not modules:
                raise InputRejected(f"{ADAPTER_FILE} holds no LoRA tensors")
            for m in modules:
                if m + SUFFIX_B not in keys:
                    raise InputRejected(f"{m}: lora_A without lora_B")
                a = f.get_tensor(m + SUFFIX_A).astype(np.float64)
                b = f.get_tensor(m + SUFFIX_B).astype(np.float64)
                _check_pair(m, a, b)
                shapes[m] = (int(b.shape[0]), int(a.shape[0]), int(a.shape[1]))
                # ||B A||_F^2 = trace((B^T B)(A A^T)): exact, and only r x r work.
                sq_norm += float(np.trace((b.T @ b) @ (a @ a.T)))
    except InputRejected:
        raise
    except Exception as exc:  # a corrupt or non-safetensors file
        raise InputRejected(f"{ADAPTER_FILE} is not a readable safetensors file ({exc})") from exc
    return shapes, sq_norm


def _number(
    meta: dict[str, Any], key: str, default: float, lo: float, hi: float, integer: bool = False
) -> float:
    """A number from an input's manifest meta, or InputRejected naming the field (a string, a
    bool, NaN, Inf or a value out of range is a verdict on the input, never a crash)."""
    value = meta.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputRejected(f"manifest meta.{key} must be a number, not {value!r:.40}")
    if integer and value != int(value):
        raise InputRejected(f"manifest meta.{key} must be a whole number, not {value!r}")
    if not (math.isfinite(value) and (value == default or lo <= value <= hi)):
        raise InputRejected(f"manifest meta.{key} {value!r} is outside [{lo:g}, {hi:g}]")
    return int(value) if integer else float(value)


def load_adapter(directory: Path, key: str, digest: str, base_digest: str) -> Adapter:
    """Verify an input in `directory` (manifest.json plus its files) before any math."""
    raw = (directory / MANIFEST_FILE).read_bytes()
    actual = digest_of(raw)
    if actual != digest:
        raise InputRejected(
            f"manifest.json digest {actual[:19]}... is not the announced {digest[:19]}..."
        )
    try:
        manifest = Manifest.from_json(raw.decode(), f"{key}/manifest.json")
        verify_dir(directory, manifest)
    except (ManifestError, UnicodeDecodeError) as exc:
        raise InputRejected(str(exc)) from exc
    if manifest.base_model_digest != base_digest:
        raise InputRejected(
            f"trained for base model {manifest.base_model_digest[:19]}..., "
            f"not {base_digest[:19]}..."
        )
    if ADAPTER_FILE not in {f.name for f in manifest.files}:
        raise InputRejected(f"the manifest lists no {ADAPTER_FILE}")
    meta = manifest.meta
    rank = _number(meta, "rank", 0, 0, 4096, integer=True)
    alpha = _number(meta, "alpha", rank or 1, 1e-6, 1e6)
    path = directory / ADAPTER_FILE
    shapes, sq_norm = _read_factors(path)
    if rank and any(r != rank for _, r, _ in shapes.values()):
        raise InputRejected(f"the manifest says rank {rank}, the tensors disagree")
    # Composites (merged by this program) store their scale folded in ("scale": 1); a
    # contribution's scale is always alpha / rank, never a number of its own choosing.
    if manifest.kind == "composite":
        scale = _number(meta, "scale", 1.0, 1e-6, 1e6)
    else:
        scale = alpha / (rank or next(iter(shapes.values()))[1])
    return Adapter(
        key,
        digest,
        path,
        scale,
        shapes,
        str(meta.get("task", "")),
        meta,
        math.sqrt(max(sq_norm, 0.0)) * scale,
    )


def check_compatible(adapters: list[Adapter]) -> tuple[list[Adapter], dict[str, str]]:
    """Drop inputs whose modules disagree in shape with the majority, or whose norm is an
    outlier; returns (kept, {key: reason})."""
    rejected: dict[str, str] = {}
    shape_of: dict[str, tuple[int, int]] = {}
    votes: dict[tuple[str, tuple[int, int]], int] = {}
    for ad in adapters:
        for m, (d, _, k) in ad.shapes.items():
            votes[(m, (d, k))] = votes.get((m, (d, k)), 0) + 1
    for (m, dk), _votes in sorted(votes.items(), key=lambda kv: -kv[1]):
        shape_of.setdefault(m, dk)
    for ad in adapters:
        for m, (d, _, k) in ad.shapes.items():
            if shape_of[m] != (d, k):
                rejected[ad.key] = (
                    f"incompatible target module {m}: {d} x {k}, the other "
                    f"inputs have {shape_of[m][0]} x {shape_of[m][1]}"
                )
                break
    kept = [a for a in adapters if a.key not in rejected]
    if len(kept) >= 3:
        norms = sorted(a.norm for a in kept)
        median = norms[len(norms) // 2]
        for a in kept:
            if median > 0 and a.norm > OUTLIER_FACTOR * median:
                rejected[a.key] = (
                    f"outlier update norm {a.norm:.3g}, more than {OUTLIER_FACTOR:g}x "
                    f"the median input's {median:.3g}"
                )
        kept = [a for a in kept if a.key not in rejected]
    return kept, rejected


_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64"}


class StreamingWriter:
    """Writes a safetensors file tensor by tensor: the header (names, dtypes, shapes) is known
    up front, so no more than one tensor is ever held for writing."""

    def __init__(
        self,
        path: Path,
        layout: list[tuple[str, tuple[int, ...]]],
        dtype: str = "float32",
        metadata: dict[str, str] | None = None,
    ) -> None:
        code, size = _DTYPES[dtype], np.dtype(dtype).itemsize
        header: dict[str, Any] = {"__metadata__": metadata or {}}
        offset = 0
        self._order = []
        for name, shape in layout:
            n = math.prod(shape) * size
            header[name] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            self._order.append((name, shape))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        self.dtype = dtype
        self._le = np.dtype(dtype).newbyteorder("<")  # safetensors stores little-endian
        self._f = path.open("wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: np.ndarray[Any, Any]) -> None:
        expected, shape = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {expected} {shape}, got {name} {tuple(tensor.shape)}")
        # The array's own buffer, not a bytes copy of it.
        self._f.write(np.ascontiguousarray(tensor, dtype=self._le).data.cast("B"))
        self._next += 1

    def abort(self) -> None:
        """Close and remove a half-written file: nothing half-written is left behind."""
        self._f.close()
        Path(self._f.name).unlink(missing_ok=True)

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} tensors were never written")
        self._f.close()


def modules_of(adapters: list[Adapter]) -> Iterator[str]:
    yield from sorted({m for a in adapters for m in a.shapes})
