"""A static picture of the MedForge dashboard: every panel's own queries, run against a real
Prometheus, drawn with matplotlib in the dashboard's grid. No Grafana runs here; this is how
docs/images/dashboard.png is made (the monitoring cluster test calls it when
MEDFORGE_DASHBOARD_PNG names a file).

    python -m tests.dashboard_preview http://127.0.0.1:9090 docs/images/dashboard.png
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import requests

from tools import monitoring

BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLOURS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9"]


def _legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return text or ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"


def _range(url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    step = max(1.0, (end - start) / 200)
    r = requests.get(
        f"{url}/api/v1/query_range",
        params={
            "query": monitoring.as_all(expr),
            "start": str(start),
            "end": str(end),
            "step": str(step),
        },
        timeout=30,
    )
    result: list[dict[str, Any]] = r.json().get("data", {}).get("result", [])
    return result


def _instant(url: str, expr: str, at: float) -> list[dict[str, Any]]:
    r = requests.get(
        f"{url}/api/v1/query",
        params={"query": monitoring.as_all(expr), "time": str(at)},
        timeout=30,
    )
    result: list[dict[str, Any]] = r.json().get("data", {}).get("result", [])
    return result


def render(url: str, out: Path, start: float, end: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = monitoring.dashboard()
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit = 0.62  # inches per grid unit of height
    fig = plt.figure(figsize=(24 * 0.9, rows * unit), facecolor=BG)
    by_title = {p.title: p for row in monitoring.ROWS for p in row.panels}
    for p in panels:
        g = p["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        bottom, height = 1 - (g["y"] + g["h"]) / rows, g["h"] / rows
        if p["type"] == "row":
            fig.text(
                left + 0.005,
                bottom + height / 2,
                p["title"],
                color=TEXT,
                fontsize=13,
                weight="bold",
                va="center",
            )
            continue
        ax = fig.add_axes((left + 0.004, bottom + 0.012, width - 0.008, height - 0.03))
        ax.set_facecolor(PANEL)
        for side in ax.spines.values():
            side.set_color(GRID)
        ax.set_title(p["title"], color=TEXT, fontsize=10, loc="left")
        ax.tick_params(colors=TEXT, labelsize=7)
        spec = by_title[p["title"]]
        _draw(ax, p["type"], spec.targets, url, start, end)
    fig.text(
        0.995,
        0.002,
        "MedForge dashboard: panel queries against a real Prometheus "
        "(rendered by tests/dashboard_preview.py)",
        color=GRID,
        fontsize=7,
        ha="right",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70, facecolor=BG)
    plt.close(fig)


def _draw(
    ax: Any, kind: str, targets: list[tuple[str, str]], url: str, start: float, end: float
) -> None:
    if kind == "timeseries":
        n = 0
        for expr, fmt in targets:
            for series in _range(url, expr, start, end):
                xs = [float(t) - end for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(
                    xs,
                    ys,
                    color=COLOURS[n % len(COLOURS)],
                    linewidth=1.5,
                    label=_legend(fmt, series["metric"])[:40],
                )
                n += 1
        ax.grid(color=GRID, linewidth=0.5)
        ax.set_xlabel("seconds before now", color=TEXT, fontsize=7)
        if n:
            ax.legend(
                fontsize=6, facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT, loc="upper left"
            )
        return
    values = [
        (_legend(fmt, s["metric"]), float(s["value"][1]))
        for expr, fmt in targets
        for s in _instant(url, expr, end)
    ]
    ax.set_xticks([])
    ax.set_yticks([])
    if kind == "stat":
        text = "\n".join(f"{v:.3g}" for _, v in values[:2]) or "-"
        ax.text(
            0.5,
            0.45,
            text,
            color=COLOURS[0],
            fontsize=26,
            ha="center",
            va="center",
            transform=ax.transAxes,
            weight="bold",
        )
    elif kind == "bargauge":
        for i, (label, v) in enumerate(values[:6]):
            ax.barh(i, v, color=COLOURS[i % len(COLOURS)])
            ax.text(0, i, f" {label[:40]}  {v:g}", color=BG, fontsize=7, va="center")
        ax.invert_yaxis()
    else:  # table
        lines = [f"{label[:70]:<70} {v:g}" for label, v in values[:8]] or ["(no rows)"]
        ax.text(
            0.01,
            0.95,
            "\n".join(lines),
            color=TEXT,
            fontsize=7,
            family="monospace",
            va="top",
            transform=ax.transAxes,
        )


if __name__ == "__main__":
    now = time.time()
    render(
        sys.argv[1], Path(sys.argv[2]), now - float(sys.argv[3] if len(sys.argv) > 3 else 600), now
    )
