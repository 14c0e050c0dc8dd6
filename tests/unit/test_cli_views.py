"""What `medforge status` and `describe` print, from objects alone; every command's help has an
example."""

from __future__ import annotations

import datetime as dt

import pytest

from medforge_cli import views
from medforge_cli.main import parser

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def composite() -> dict[str, object]:
    return {
        "metadata": {
            "name": "foundation",
            "namespace": "forge",
            "creationTimestamp": "2026-11-28T12:00:00Z",
        },
        "spec": {"baseModel": {"name": "clip"}, "strategy": {"type": "fusion"}},
        "status": {
            "phase": "Ready",
            "inputCounts": {"Included": 2, "Pending": 1, "Excluded": 1},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "RevisionReady",
                    "message": "serving revision 3",
                }
            ],
            "current": {
                "revision": 3,
                "score": 0.84,
                "digest": "sha256:" + "a" * 64,
                "metrics": {"derm": {"accuracy": 0.9, "f1": 0.88}, "xray": {"accuracy": 0.78}},
            },
            "history": [
                {
                    "revision": 3,
                    "state": "Accepted",
                    "score": 0.84,
                    "completedAt": "2026-11-29T11:00:00Z",
                    "metrics": {"derm": {"accuracy": 0.9}, "xray": {"accuracy": 0.78}},
                },
                {
                    "revision": 2,
                    "state": "Rejected",
                    "reason": "RegressionOverGate",
                    "message": "xray regressed",
                },
                {
                    "revision": 1,
                    "state": "Accepted",
                    "score": 0.7,
                    "metrics": {"derm": {"accuracy": 0.7}},
                },
            ],
            "inputs": [
                {
                    "namespace": "h1",
                    "name": "a",
                    "state": "Excluded",
                    "reason": "RejectedByGate",
                    "task": "xray",
                }
            ],
        },
    }


def test_describe_shows_revisions_inputs_metrics_and_a_chart() -> None:
    text = views.describe_composite(composite(), NOW)
    assert "serving:      revision 3, score 0.840" in text
    assert "RegressionOverGate" in text and "RejectedByGate" in text
    assert "Accuracy per task over revisions:" in text
    chart = text.split("Accuracy per task over revisions:")[1]
    derm = next(line for line in chart.splitlines() if line.strip().startswith("derm "))
    assert "r1 0.700 -> r3 0.900" in derm
    assert views.composite_row(composite(), NOW)[5] == "2/1/1"
    assert views.age("2026-11-28T12:00:00Z", NOW) == "1d"


def test_describe_prints_the_revision_by_site_matrix() -> None:
    c = composite()
    st = c["status"]
    assert isinstance(st, dict)
    fig = {"accuracy": 0.9, "samples": 40}
    st["history"] = [
        {
            "revision": 4,
            "state": "Rejected",
            "reason": "SiteRegression",
            "sites": [
                {
                    "site": "h-a/evs",
                    "state": "Reported",
                    "candidate": {**fig, "accuracy": 0.5},
                    "served": fig,
                },
                {"site": "h-b/evs", "state": "TooSmall"},
            ],
        },
        {
            "revision": 3,
            "state": "Accepted",
            "sites": [{"site": "h-a/evs", "state": "Reported", "candidate": fig}],
        },
    ]
    st["pendingRevision"] = {
        "revision": 5,
        "evaluation": {"sites": [{"site": "h-b/evs", "state": "Pending"}]},
    }
    text = views.describe_composite(c, NOW)
    matrix = text.split("Sites (revision x site):")[1]
    header = matrix.strip().splitlines()[0].split()
    assert (
        header[:2] == ["SITE", "REV"] and "5*" in header and header.index("5*") < header.index("4")
    )
    row_a = next(line for line in matrix.splitlines() if line.startswith("h-a/evs"))
    assert "0.500 (0.900) n=40" in row_a and "0.900 n=40" in row_a
    row_b = next(line for line in matrix.splitlines() if line.startswith("h-b/evs"))
    assert "pending" in row_b and "too small" in row_b


def test_sparkline_rises_with_the_values() -> None:
    line = views.sparkline([0.1, 0.5, 0.9])
    assert len(line) == 3 and line[0] < line[1] < line[2]


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["describe"],
        ["logs"],
        ["wait"],
        ["model", "push"],
        ["model", "verify"],
        ["composite", "pull"],
        ["predict"],
        ["evaluate"],
    ],
)
def test_every_command_has_help_with_an_example(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0
    assert "example" in capsys.readouterr().out
