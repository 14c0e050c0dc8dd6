"""docs/crd-reference.md, generated from the CRD schemas in crds/ (their descriptions are the
reference). `make generate` rewrites it; a unit test regenerates
it and fails when the committed file differs, so the two never drift."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "crds"
TARGET = ROOT / "docs" / "crd-reference.md"
ORDER = (
    "BaseModel",
    "LoRAContribution",
    "CompositeModel",
    "EvaluationSet",
    "PrivacyBudget",
    "Institution",
)
JSON = dict[str, Any]


def _type(s: JSON) -> str:
    if s.get("x-kubernetes-int-or-string"):
        return "int or string"
    t = str(s.get("type", "object" if s.get("x-kubernetes-preserve-unknown-fields") else ""))
    if t == "array":
        return f"[]{_type(s.get('items') or {})}"
    if t == "object" and isinstance(s.get("additionalProperties"), dict):
        return f"map[string]{_type(s['additionalProperties'])}"
    return t


def _constraints(s: JSON) -> str:
    parts = []
    if "enum" in s:
        parts.append("one of " + ", ".join(f"`{v}`" for v in s["enum"]))
    if "default" in s:
        parts.append(f"default `{yaml.safe_dump(s['default'], default_flow_style=True).strip()}`")
    for key, word in (
        ("minimum", "min"),
        ("maximum", "max"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
    ):
        if key in s:
            parts.append(f"{word} {s[key]}")
    if "pattern" in s:
        parts.append(f"pattern `{s['pattern']}`")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _fields(schema: JSON, path: str, required: set[str]) -> Iterator[tuple[str, str, str, str]]:
    """(path, type, constraints, description) for every field below `schema`, depth first."""
    for name, sub in (schema.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        req = " (required)" if name in required else ""
        desc = _cell(sub.get("description", ""))
        yield here, _type(sub) + req, _cell(_constraints(sub)), desc
        inner = sub.get("items") if sub.get("type") == "array" else sub
        if isinstance(inner, dict) and inner.get("properties"):
            yield from _fields(
                inner,
                here + ("[]" if sub.get("type") == "array" else ""),
                set(inner.get("required") or []),
            )


def _rules(schema: JSON, path: str) -> Iterator[tuple[str, str, str]]:
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path or "(object)", _cell(rule.get("rule", "")), _cell(rule.get("message", ""))
    for name, sub in (schema.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        yield from _rules(sub, here)
        if sub.get("type") == "array" and isinstance(sub.get("items"), dict):
            yield from _rules(sub["items"], here + "[]")


def _section(crd: JSON) -> list[str]:
    names = crd["spec"]["names"]
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    root = version["schema"]["openAPIV3Schema"]
    out = [
        f"## {names['kind']}",
        "",
        f"`{crd['spec']['group']}/{version['name']}`, {crd['spec']['scope']}; "
        f"plural `{names['plural']}`"
        + (
            f", short names {', '.join(f'`{s}`' for s in names.get('shortNames', []))}"
            if names.get("shortNames")
            else ""
        )
        + ".",
        "",
        _cell(root.get("description", "")),
        "",
    ]
    columns = version.get("additionalPrinterColumns") or []
    if columns:
        out += [
            "`kubectl get` columns: "
            + ", ".join(f"{c['name']} (`{c['jsonPath']}`)" for c in columns)
            + ".",
            "",
        ]
    for part in ("spec", "status"):
        schema = (root.get("properties") or {}).get(part)
        if not schema:
            continue
        out += [f"### {part}", "", _cell(schema.get("description", "")), ""]
        out += ["| field | type | constraints | description |", "|---|---|---|---|"]
        for path, typ, cons, desc in _fields(schema, "", set(schema.get("required") or [])):
            out.append(f"| `{part}.{path}` | {typ} | {cons} | {desc} |")
        out.append("")
        rules = list(_rules(schema, part))
        if rules:
            out += ["Validation rules (CEL, enforced by the API server):", ""]
            out += ["| where | rule | message |", "|---|---|---|"]
            out += [f"| `{w}` | `{r}` | {m} |" for w, r, m in rules]
            out.append("")
    return out


def render(crd_dir: Path = CRDS) -> str:
    crds = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        crds[doc["spec"]["names"]["kind"]] = doc
    lines = [
        "# CRD reference",
        "",
        "Generated from `crds/` by `make generate`; do not edit. "
        "`make test` regenerates it and fails when it differs.",
        "",
    ]
    for kind in sorted(crds, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k)):
        lines += _section(crds[kind])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else TARGET
    target.write_text(render())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
