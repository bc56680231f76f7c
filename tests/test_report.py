"""Tests of the Table 9 report, built from runs logged to a real ``mlflow server``."""

from __future__ import annotations

import io
import math
import statistics
import uuid
from pathlib import Path

import pandas as pd
import pytest
from conftest import MlflowServer

from dst import UsageError
from dst._report import (
    FORMATS,
    NEGATIVE_TRANSFER_MARK,
    _log_synthetic_study,
    _SyntheticTrial,
    build_report,
    render_report,
)
from dst.cli import main

TASKS = ["T1 gender", "T2/spectacles"]
"""Task names; the slash makes the MLflow key (``T2_spectacles``) differ from the name."""

# The 19 fixed rows in the order the report must show them: Table 9, random drop, STL.
FIXED_ROWS: list[tuple[str, dict]] = [
    ("MTL", {"scheduler": "mtl", "lambdas": None, "beta": None}),
    ("leave out depth", {"lambdas": (0.0, 0.25, 0.25, 0.25, 0.25)}),
    ("leave out count", {"lambdas": (0.25, 0.0, 0.25, 0.25, 0.25)}),
    ("leave out incompleteness", {"lambdas": (0.25, 0.25, 0.0, 0.25, 0.25)}),
    ("leave out stagnancy", {"lambdas": (0.25, 0.25, 0.25, 0.0, 0.25)}),
    ("leave out regulariser", {"lambdas": (0.25, 0.25, 0.25, 0.25, 0.0)}),
    ("only depth", {"lambdas": (1.0, 0.0, 0.0, 0.0, 0.0)}),
    ("only count", {"lambdas": (0.0, 1.0, 0.0, 0.0, 0.0)}),
    ("only incompleteness", {"lambdas": (0.0, 0.0, 1.0, 0.0, 0.0)}),
    ("only stagnancy", {"lambdas": (0.0, 0.0, 0.0, 1.0, 0.0)}),
    ("varying 1", {"lambdas": (0.2, 0.2, 0.3, 0.3, 0.0)}),
    ("varying 2", {"lambdas": (0.1, 0.1, 0.4, 0.4, 0.0)}),
    ("varying 3", {"lambdas": (0.4, 0.4, 0.1, 0.1, 0.0)}),
    ("regularised 1", {"lambdas": (0.15, 0.15, 0.3, 0.3, 0.1)}),
    ("regularised 2", {"lambdas": (0.3, 0.3, 0.15, 0.15, 0.1)}),
    ("proposed", {"lambdas": (0.2, 0.2, 0.2, 0.2, 0.2)}),
    ("random 0.5", {"scheduler": "random", "lambdas": None, "p": 0.5}),
    ("random 0.75", {"scheduler": "random", "lambdas": None, "p": 0.75}),
    ("STL", {"scheduler": "stl", "lambdas": None, "beta": None}),
]
FIXED_GROUPS = ["traditional MTL", *["leave one out"] * 5, *["only static"] * 2]
FIXED_GROUPS += [*["only dynamic"] * 2, *["varying, no regulariser"] * 3]
FIXED_GROUPS += [*["varying, with regulariser"] * 2, "proposed", "random drop", "random drop"]
FIXED_GROUPS += ["STL"]


@pytest.fixture
def tracking_uri(mlflow_server: MlflowServer) -> str:
    """URL of the session's real ``mlflow server``; each test uses its own study."""
    return mlflow_server.url


def new_study_name() -> str:
    return f"report-{uuid.uuid4().hex[:8]}"


def row_of(report: pd.DataFrame, label: str) -> pd.Series:
    rows = report[report["row"] == label]
    assert len(rows) == 1, f"expected one row {label!r}, got {len(rows)}"
    return rows.iloc[0]


def test_rows_follow_table9_then_labels_then_sampled(tracking_uri: str) -> None:
    fixed = [
        _SyntheticTrial(errors=((10.0 + index, 20.0 + index),), label=label, **settings)
        for index, (label, settings) in enumerate(FIXED_ROWS)
    ]
    others = [
        # The inverse count term is a different ablation, so this is no "proposed" row.
        _SyntheticTrial(errors=((5.0, 5.0),), label="inverse count", count_metric="inverse"),
        _SyntheticTrial(errors=((6.0, 6.0),), label="equal dynamic", lambdas=(0, 0, 0.5, 0.5, 0)),
    ]
    sampled = [
        _SyntheticTrial(errors=((30.0, 30.0),), lambdas=(0.1, 0.2, 0.3, 0.2, 0.2)),
        _SyntheticTrial(errors=((10.0, 12.0),), lambdas=(0.3, 0.2, 0.1, 0.2, 0.2)),
        _SyntheticTrial(errors=((20.0, 20.0),), lambdas=(0.2, 0.1, 0.3, 0.2, 0.2)),
    ]
    # Enqueue in an order unlike Table 9's: sampled first, fixed rows reversed.
    trials = [*sampled, others[0], *reversed(fixed), others[1]]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS)

    report = build_report(tracking_uri, study)

    sampled_rows = ["trial 1", "trial 2", "trial 0"]
    expected = [label for label, _ in FIXED_ROWS] + ["inverse count", "equal dynamic"]
    assert report["row"].tolist() == expected + sampled_rows
    assert report["group"].tolist()[:19] == FIXED_GROUPS
    assert report["group"].tolist()[19:] == ["", "", "sampled", "sampled", "sampled"]
    assert report["avg_error_mean"].tolist()[-3:] == [11.0, 20.0, 30.0]
    assert report["n_seeds"].tolist() == [1] * len(report)


def test_rows_carry_lambdas_beta_and_trial(tracking_uri: str) -> None:
    trials = [
        _SyntheticTrial(
            errors=((10.0, 20.0),), label="MTL", scheduler="mtl", lambdas=None, beta=None
        ),
        _SyntheticTrial(
            errors=((10.0, 20.0),), label="varying 1", lambdas=(0.2, 0.2, 0.3, 0.3, 0)
        ),
        _SyntheticTrial(
            errors=((10.0, 20.0),),
            label="drop",
            scheduler="random",
            lambdas=None,
            beta=None,
            p=0.75,
        ),
    ]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS)

    report = build_report(tracking_uri, study)

    varying = row_of(report, "varying 1")
    assert varying["scheduler"] == "dst"
    assert varying["trial"] == 1
    lambdas = [varying[f"lambda_{name}"] for name in "dcurb"]
    assert lambdas == [0.2, 0.2, 0.3, 0.3, 0.0]
    assert varying["beta"] == 0.1
    mtl = row_of(report, "MTL")
    assert all(math.isnan(mtl[f"lambda_{name}"]) for name in "dcurb")
    assert math.isnan(mtl["beta"])
    assert math.isnan(mtl["p"])
    assert math.isnan(varying["p"])
    assert row_of(report, "drop")["p"] == 0.75
    assert "p" in render_report(report, "csv").splitlines()[0].split(",")


def test_values_are_mean_and_std_over_seeds(tracking_uri: str) -> None:
    errors = ((10.0, 20.0), (12.0, 26.0), (14.0, 23.0))
    trials = [_SyntheticTrial(errors=errors, label="proposed")]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS)

    row = row_of(build_report(tracking_uri, study), "proposed")

    assert row["n_seeds"] == 3
    assert row["metric_mean/T1 gender"] == pytest.approx(88.0)
    assert row["metric_std/T1 gender"] == pytest.approx(2.0)
    assert row["metric_mean/T2/spectacles"] == pytest.approx(77.0)
    assert row["metric_std/T2/spectacles"] == pytest.approx(3.0)
    assert row["error_mean/T2/spectacles"] == pytest.approx(23.0)
    seed_averages = [statistics.mean(seed_errors) for seed_errors in errors]
    assert row["avg_error_mean"] == pytest.approx(statistics.mean(seed_averages))
    assert row["avg_error_std"] == pytest.approx(statistics.stdev(seed_averages))


def test_failed_and_killed_runs_are_left_out(tracking_uri: str) -> None:
    trials = [
        # The failed attempt is 50 points worse and has a FINISHED seed run of its own.
        _SyntheticTrial(
            errors=((10.0, 20.0), (12.0, 22.0)),
            label="MTL",
            scheduler="mtl",
            lambdas=None,
            failed_attempt=True,
        ),  # fmt: skip
        _SyntheticTrial(
            errors=((10.0, 20.0),), label="STL", scheduler="stl", lambdas=None, failed_attempt=True
        ),  # fmt: skip
        _SyntheticTrial(errors=((5.0, 5.0),), label="pruned", status="KILLED"),
        _SyntheticTrial(errors=((6.0, 6.0),), status="FAILED"),
    ]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS)

    report = build_report(tracking_uri, study)

    assert report["row"].tolist() == ["MTL", "STL"]
    mtl = row_of(report, "MTL")
    assert mtl["n_seeds"] == 2
    assert mtl["error_mean/T1 gender"] == pytest.approx(11.0)
    assert mtl["avg_error_mean"] == pytest.approx(16.0)
    stl = row_of(report, "STL")
    assert stl["n_seeds"] == 1
    assert stl["avg_error_mean"] == pytest.approx(15.0)


def test_stl_row_reads_per_task_runs(tracking_uri: str) -> None:
    trials = [
        _SyntheticTrial(errors=((8.0, 30.0),), label="STL one seed", scheduler="stl"),
        _SyntheticTrial(errors=((8.0, 30.0), (10.0, 26.0)), label="STL", scheduler="stl"),
    ]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS)

    report = build_report(tracking_uri, study)

    one_seed = row_of(report, "STL one seed")
    assert one_seed["metric_mean/T1 gender"] == pytest.approx(92.0)
    assert one_seed["metric_mean/T2/spectacles"] == pytest.approx(70.0)
    assert one_seed["avg_error_mean"] == pytest.approx(19.0)
    two_seeds = row_of(report, "STL")
    assert two_seeds["n_seeds"] == 2
    assert two_seeds["error_mean/T1 gender"] == pytest.approx(9.0)
    assert two_seeds["error_mean/T2/spectacles"] == pytest.approx(28.0)
    assert two_seeds["avg_error_mean"] == pytest.approx(18.5)
    assert two_seeds["avg_error_std"] == pytest.approx(statistics.stdev([19.0, 18.0]))


def test_gap_to_stl_marks_negative_transfer(tracking_uri: str) -> None:
    trials = [
        _SyntheticTrial(errors=((8.0, 30.0), (10.0, 28.0)), label="STL", scheduler="stl"),
        _SyntheticTrial(errors=((12.0, 25.0), (12.0, 25.0)), label="MTL", scheduler="mtl"),
    ]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS)

    report = build_report(tracking_uri, study)

    assert report.attrs["stl_row"] == "STL"
    mtl = row_of(report, "MTL")
    assert mtl["gap/T1 gender"] == pytest.approx(3.0)
    assert mtl["gap/T2/spectacles"] == pytest.approx(-4.0)
    assert row_of(report, "STL")["gap/T1 gender"] == 0.0
    text = render_report(report, "text")
    assert f"+3.00 {NEGATIVE_TRANSFER_MARK}" in text
    assert f"-4.00 {NEGATIVE_TRANSFER_MARK}" not in text
    assert "-4.00" in text
    assert "negative transfer" in text


def test_report_without_stl_row_has_no_gaps(tracking_uri: str) -> None:
    trials = [_SyntheticTrial(errors=((12.0, 25.0),), label="MTL", scheduler="mtl")]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS)

    report = build_report(tracking_uri, study)

    assert report.attrs["stl_row"] is None
    assert math.isnan(row_of(report, "MTL")["gap/T1 gender"])
    text = render_report(report, "text")
    assert "T1 gender gap" not in text
    assert "no STL row" in text


def test_last_finished_run_of_a_label_wins(tracking_uri: str) -> None:
    trials = [
        _SyntheticTrial(errors=((40.0, 40.0),), label="proposed"),
        _SyntheticTrial(errors=((10.0, 20.0),), label="proposed"),
    ]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS, n_threads=1)

    report = build_report(tracking_uri, study)

    assert report["row"].tolist() == ["proposed"]
    assert row_of(report, "proposed")["avg_error_mean"] == pytest.approx(15.0)


def test_search_pages_through_every_run(tracking_uri: str) -> None:
    trials = [
        _SyntheticTrial(errors=((float(index), 10.0), (float(index) + 2.0, 12.0)))
        for index in range(6)
    ]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS, n_epochs=2)

    paged = build_report(tracking_uri, study, page_size=4)
    whole = build_report(tracking_uri, study)

    assert len(paged) == 6
    assert paged["n_seeds"].tolist() == [2] * 6
    pd.testing.assert_frame_equal(paged, whole)


def test_every_format_renders_values_and_footnotes(tracking_uri: str) -> None:
    trials = [
        _SyntheticTrial(errors=((8.0, 30.0), (10.0, 28.0)), label="STL", scheduler="stl"),
        _SyntheticTrial(errors=((12.0, 25.0), (14.0, 25.0)), label="a<b|c", scheduler="mtl"),
    ]
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, trials, TASKS)
    report = build_report(tracking_uri, study)

    outputs = {fmt: render_report(report, fmt) for fmt in FORMATS}

    for fmt in ("markdown", "html", "text"):
        assert "87.00 ± 1.41" in outputs[fmt], fmt
        assert "sample standard deviation" in outputs[fmt], fmt
        assert NEGATIVE_TRANSFER_MARK in outputs[fmt], fmt
    assert "| a<b\\|c | traditional MTL |" in outputs["markdown"]
    assert outputs["markdown"].splitlines()[1].startswith("| --- |")
    assert "a&lt;b|c" in outputs["html"]
    assert "<th>T2/spectacles gap</th>" in outputs["html"]
    assert outputs["text"].splitlines()[1].startswith("a<b|c")
    parsed = pd.read_csv(io.StringIO(outputs["csv"]))
    assert parsed["row"].tolist() == ["a<b|c", "STL"]
    assert parsed["metric_mean/T1 gender"].tolist() == pytest.approx([87.0, 91.0])
    assert parsed["gap/T1 gender"].tolist() == pytest.approx([4.0, 0.0])


def test_unknown_format_raises_usage_error() -> None:
    report = pd.DataFrame({"row": [], "group": []})

    with pytest.raises(UsageError, match="unknown report format 'pdf'; use one of csv"):
        render_report(report, "pdf")


def test_unknown_study_lists_existing_studies(tracking_uri: str) -> None:
    study = new_study_name()
    _log_synthetic_study(tracking_uri, study, [_SyntheticTrial(errors=((1.0, 2.0),))], TASKS)

    with pytest.raises(UsageError, match="study 'missing' not found in MLflow") as raised:
        build_report(tracking_uri, "missing")

    assert study in str(raised.value)
    assert "\n" not in str(raised.value)


def test_study_without_finished_runs_raises_usage_error(tracking_uri: str) -> None:
    study = new_study_name()
    trials = [
        _SyntheticTrial(errors=((1.0, 2.0),), status="FAILED"),
        _SyntheticTrial(errors=((1.0, 2.0),), label="MTL", scheduler="mtl", status="KILLED"),
    ]
    _log_synthetic_study(tracking_uri, study, trials, TASKS)

    with pytest.raises(UsageError, match=f"study '{study}' has no finished runs") as raised:
        build_report(tracking_uri, study)

    assert "run a worker first" in str(raised.value)


def test_report_reads_sqlite_tracking_uri(tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = [
        _SyntheticTrial(errors=((8.0, 30.0),), label="STL", scheduler="stl"),
        _SyntheticTrial(errors=((10.0, 20.0), (12.0, 22.0)), label="proposed"),
        _SyntheticTrial(errors=((9.0, 9.0),), failed_attempt=True),
    ]
    _log_synthetic_study(tracking_uri, "sqlite study", trials, TASKS)

    report = build_report(tracking_uri, "sqlite study")

    assert report["row"].tolist() == ["proposed", "STL", "trial 3"]
    proposed = row_of(report, "proposed")
    assert proposed["metric_mean/T1 gender"] == pytest.approx(89.0)
    assert proposed["gap/T1 gender"] == pytest.approx(3.0)
    assert proposed["gap/T2/spectacles"] == pytest.approx(-9.0)
    assert row_of(report, "trial 3")["avg_error_mean"] == pytest.approx(9.0)
    assert "89.00 ± 1.41" in render_report(report, "markdown")


def test_report_command_writes_format_of_suffix(tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = [_SyntheticTrial(errors=((10.0, 20.0),), label="proposed")]
    _log_synthetic_study(tracking_uri, "suffixes", trials, TASKS)
    report = ["report", "--study", "suffixes", "--tracking-uri", tracking_uri]

    for name, expected in [("r.md", "| --- |"), ("r.csv", "row,"), ("r.html", "<table")]:
        assert main([*report, "--output", str(tmp_path / name)]) == 0
        assert expected in (tmp_path / name).read_text(), name

    assert main([*report, "--output", str(tmp_path / "r.json")]) == 2
    assert not (tmp_path / "r.json").exists()
    assert main([*report, "--output", str(tmp_path / "r.json"), "--format", "csv"]) == 0
