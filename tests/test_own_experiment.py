"""The worked example of docs/own-experiment.md, run through the ``dst`` command line.

The example package ``two_moons`` lives in ``examples/``, which every subprocess gets on
``PYTHONPATH``, as the documentation instructs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from dst.cli import main

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLES = REPOSITORY / "examples"
STUDY_FILE = EXAMPLES / "two_moons" / "study.toml"
EXAMPLE = "two_moons:TwoMoonsExperiment"


def run_dst(*arguments: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m dst`` with ``examples/`` on ``PYTHONPATH`` and no service settings."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DST_STORAGE", "MLFLOW_TRACKING_URI")
    }
    paths = [str(REPOSITORY), str(EXAMPLES), environment.get("PYTHONPATH", "")]
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    environment["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "dst", *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_example_trains_with_dst_train(tmp_path: Path) -> None:
    output = tmp_path / "run"
    completed = run_dst(
        "train", "--experiment", EXAMPLE, "--n-epochs", "6", "--output-dir", str(output),
        cwd=tmp_path,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr[-3000:]
    epochs = pd.read_csv(output / "epochs.csv")
    assert epochs["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    assert epochs["val_avg_error"].iloc[-1] < epochs["val_avg_error"].iloc[0] - 10
    assert "val_error/moon" in epochs.columns
    assert "val_error/angle" in epochs.columns
    assert "moon" in completed.stdout
    assert "angle" in completed.stdout


@pytest.mark.slow
def test_example_study_runs_with_worker(tmp_path: Path, postgres_database, mlflow_server) -> None:
    storage = postgres_database()
    service = ["--storage", storage, "--tracking-uri", mlflow_server.url]
    created = run_dst(
        "study", "create", str(STUDY_FILE), *service, "--n-epochs", "2", "--n-trials", "2",
        cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr[-3000:]

    worker = run_dst("worker", "--study", "two-moons", "--storage", storage, cwd=tmp_path)
    assert worker.returncode == 0, worker.stderr[-3000:]

    study = optuna.load_study(study_name="two-moons", storage=storage)
    assert Counter(trial.state for trial in study.get_trials()) == {TrialState.COMPLETE: 2}
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("two-moons")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trials = [run for run in runs if run.data.tags.get("dst.run_type") == "trial"]
    assert len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"


BAD_REFERENCES = [
    ("no_such_package.module:Experiment", "cannot import experiment module"),
    ("two_moons:NoSuchExperiment", "has no attribute 'NoSuchExperiment'"),
    ("two_moons:TwoMoonsModel", "is not a subclass of dst.Experiment"),
    ("two_moons:make_moons", "is not a subclass of dst.Experiment"),
]


def test_bad_import_path_exits_2_in_subprocess(tmp_path: Path) -> None:
    reference, message = BAD_REFERENCES[0]
    completed = run_dst("train", "--experiment", reference, "--n-epochs", "2", cwd=tmp_path)

    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("dst train: error:")
    assert message in lines[0]


@pytest.mark.parametrize(("reference", "message"), BAD_REFERENCES)
def test_bad_reference_exits_2_with_one_line(
    reference: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    status = main(["train", "--experiment", reference, "--n-epochs", "2"])

    stderr = capsys.readouterr().err
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dst train: error:")
    assert message in lines[0]
