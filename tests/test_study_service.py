"""Studies as a service: ``dst study create`` and ``dst worker`` processes against the real
Postgres and a real ``mlflow server``, then ``dst report``.

Every study here trains the generated ``shapes`` experiment (or the real Omniglot subset) at
tiny sizes for 2 epochs, so each test takes well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
TINY_SHAPES = "n_samples = 96\nimage_size = 16\nwidth = 4"

pytestmark = pytest.mark.slow

PER_TASK_METRICS = (
    "train_loss",
    "probability",
    "p_depth",
    "p_count",
    "p_incompleteness",
    "p_stagnancy",
    "gate",
    "val_error",
    "test_error",
    "val_metric",
    "test_metric",
)
EPOCH_METRICS = ("val_avg_error", "test_avg_error", "epoch_seconds", "updated")
RUN_PARAMS = (
    "experiment",
    "scheduler",
    "lambda_depth",
    "lambda_count",
    "lambda_incompleteness",
    "lambda_stagnancy",
    "lambda_regularizer",
    "beta",
    "seed",
    "n_epochs",
    "lr",
    "batch_size",
    "p",
    "count_metric",
    "n_samples",
    "image_size",
)


def dst_env(**extra: str) -> dict[str, str]:
    """Return an environment for ``dst`` subprocesses without the user's service settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("DST_STORAGE", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Two workers share the machine's cores; one thread each keeps them from contending.
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def start_dst(args: Sequence[str], cwd: Path, log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "dst", *args],
        cwd=cwd,
        env=dst_env(),
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_dst(args: Sequence[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dst", *args],
        cwd=cwd,
        env=dst_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_all(processes: Sequence[subprocess.Popen], logs: Sequence[Path], timeout: float) -> None:
    for process, log in zip(processes, logs, strict=True):
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.returncode == 0, f"{process.args} failed:\n{log.read_text()[-4000:]}"


def write_study(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(body))
    return path


def search_all_runs(client: MlflowClient, study_name: str) -> list:
    experiment = client.get_experiment_by_name(study_name)
    assert experiment is not None, f"no MLflow experiment {study_name!r}"
    return client.search_runs([experiment.experiment_id], max_results=5000)


def row_labels(study: optuna.Study) -> list[str]:
    return [t.user_attrs["row"]["label"] for t in study.get_trials() if "row" in t.user_attrs]


TWO_WORKER_STUDY = f"""
    [study]
    name = "two-workers"
    n_trials = 5
    n_epochs = 2
    seeds = [0, 1]

    [experiment]
    name = "shapes"
    [experiment.options]
    {TINY_SHAPES}

    [search]
    lambdas = true

    [sampler]
    seed = 0
    n_startup_trials = 2

    [[enqueue]]
    label = "traditional MTL"
    scheduler = "mtl"

    [[enqueue]]
    label = "proposed"
    lambdas = [0.2, 0.2, 0.2, 0.2, 0.2]

    [[enqueue]]
    label = "random drop 0.5"
    scheduler = "random"
    p = 0.5
"""


def test_two_workers_run_exactly_n_trials(tmp_path, postgres_database, mlflow_server):
    storage = postgres_database()
    study_file = write_study(tmp_path, "two-workers", TWO_WORKER_STUDY)
    service = ["--storage", storage, "--tracking-uri", mlflow_server.url]
    created = run_dst(["study", "create", str(study_file), *service], tmp_path)
    assert created.returncode == 0, created.stderr

    logs = [tmp_path / f"worker-{index}.log" for index in range(2)]
    workers = [
        start_dst(["worker", "--study", "two-workers", "--storage", storage], tmp_path, log)
        for log in logs
    ]
    wait_all(workers, logs, timeout=400)

    study = optuna.load_study(study_name="two-workers", storage=storage)
    states = Counter(trial.state for trial in study.get_trials())
    assert states == {TrialState.COMPLETE: 5}
    assert sorted(row_labels(study)) == ["proposed", "random drop 0.5", "traditional MTL"]
    for log in logs:
        assert "worker stopped" in log.read_text()

    client = MlflowClient(tracking_uri=mlflow_server.url)
    runs = search_all_runs(client, "two-workers")
    by_type: dict[str, list] = {}
    for run in runs:
        by_type.setdefault(run.data.tags.get("dst.run_type"), []).append(run)
    assert len(by_type["study"]) == 1
    parent = by_type["study"][0]
    assert parent.info.status == "FINISHED"
    assert len(by_type["trial"]) == 5
    assert len(by_type["seed"]) == 10
    check_trial_runs(client, study, parent.info.run_id, by_type["trial"])
    check_seed_runs(client, by_type["trial"], by_type["seed"])

    parent_artifacts = {info.path for info in client.list_artifacts(parent.info.run_id, "report")}
    assert parent_artifacts == {"report/report.md", "report/report.csv", "report/report.html"}
    optuna_artifacts = {info.path for info in client.list_artifacts(parent.info.run_id, "optuna")}
    assert "optuna/parallel_coordinate.html" in optuna_artifacts

    report = run_dst(
        ["report", "--study", "two-workers", "--tracking-uri", mlflow_server.url], tmp_path
    )
    assert report.returncode == 0, report.stderr
    for label in ("traditional MTL", "proposed", "random drop 0.5"):
        assert label in report.stdout


def check_trial_runs(client: MlflowClient, study: optuna.Study, parent_id: str, runs) -> None:
    by_number = {int(run.data.tags["optuna.trial_number"]): run for run in runs}
    for trial in study.get_trials():
        run = by_number[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["optuna.study_name"] == "two-workers"
        assert json.loads(run.data.tags["dst.tasks"])
        label = trial.user_attrs.get("row", {}).get("label")
        assert run.data.tags.get("dst.row_label") == label
        assert set(RUN_PARAMS) <= set(run.data.params)
        assert run.data.params["seed"] == "0,1"
        assert run.data.metrics["best_val_avg_error"] == pytest.approx(trial.value)
        assert "test_avg_error_at_best" in run.data.metrics
        assert "config.json" in {info.path for info in client.list_artifacts(run.info.run_id)}
    assert by_number[0].data.params["lambda_depth"] == ""
    assert by_number[1].data.params["lambda_depth"] == "0.2"
    assert by_number[2].data.params["p"] == "0.5"


def check_seed_runs(client: MlflowClient, trial_runs, seed_runs) -> None:
    trial_ids = {run.info.run_id for run in trial_runs}
    children = Counter(run.data.tags["mlflow.parentRunId"] for run in seed_runs)
    assert set(children) == trial_ids
    assert set(children.values()) == {2}

    for run in seed_runs:
        assert run.info.status == "FINISHED"
        assert set(RUN_PARAMS) <= set(run.data.params)
        assert run.data.params["seed"] in ("0", "1")
        artifacts = {info.path for info in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"config.json", "epochs.csv", "figure6.png"}
        assert {"best_epoch", "best_val_avg_error", "test_avg_error_at_best"} <= set(
            run.data.metrics
        )
        history = client.get_metric_history(run.info.run_id, "val_avg_error")
        assert sorted(metric.step for metric in history) == [1, 2]

    dst_run = next(run for run in seed_runs if run.data.params["scheduler"] == "dst")
    keys = [key for _, key in json.loads(dst_run.data.tags["dst.tasks"])]
    expected = {f"{name}/{key}" for name in PER_TASK_METRICS for key in keys}
    expected |= set(EPOCH_METRICS)
    expected |= {
        f"{name}_at_best/{key}"
        for name in ("val_error", "test_error", "test_metric")
        for key in keys
    }
    assert expected <= set(dst_run.data.metrics)

    for name in sorted(expected):
        if "_at_best" in name:
            continue
        history = client.get_metric_history(dst_run.info.run_id, name)
        assert sorted(metric.step for metric in history) == [1, 2], name


def test_concurrent_creates_enqueue_each_row_once(tmp_path, postgres_database, mlflow_server):
    storage = postgres_database()
    study_file = write_study(tmp_path, "two-workers", TWO_WORKER_STUDY)
    service = ["--storage", storage, "--tracking-uri", mlflow_server.url]
    logs = [tmp_path / f"create-{index}.log" for index in range(2)]
    creates = [
        start_dst(["study", "create", str(study_file), *service], tmp_path, log) for log in logs
    ]
    wait_all(creates, logs, timeout=120)

    study = optuna.load_study(study_name="two-workers", storage=storage)
    assert sorted(row_labels(study)) == ["proposed", "random drop 0.5", "traditional MTL"]
    assert all(trial.state == TrialState.WAITING for trial in study.get_trials())
    client = MlflowClient(tracking_uri=mlflow_server.url)
    parents = [
        r
        for r in search_all_runs(client, "two-workers")
        if r.data.tags.get("dst.run_type") == "study"
    ]
    assert len(parents) == 1
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id


def test_two_workers_finish_shortened_table9_omniglot(
    tmp_path, postgres_database, mlflow_server, omniglot_zip
):
    storage = postgres_database()
    study_file = REPO / "studies" / "table9-omniglot.toml"
    service = ["--storage", storage, "--tracking-uri", mlflow_server.url]
    shorten = [
        "--n-epochs",
        "2",
        "--seeds",
        "1",
        "--n-trials",
        "3",
        "--option",
        "image_size=16",
        "--option",
        "width=4",
    ]
    data = ["--data-dir", str(omniglot_zip)]
    created = run_dst(["study", "create", str(study_file), *service, *shorten, *data], tmp_path)
    assert created.returncode == 0, created.stderr

    logs = [tmp_path / f"worker-{index}.log" for index in range(2)]
    worker = ["worker", "--study", "table9-omniglot", "--storage", storage, *data]
    workers = [start_dst(worker, tmp_path, log) for log in logs]
    wait_all(workers, logs, timeout=400)

    study = optuna.load_study(study_name="table9-omniglot", storage=storage)
    assert [trial.state for trial in study.get_trials(states=(TrialState.COMPLETE,))] == [
        TrialState.COMPLETE
    ] * 3
    labels = [
        t.user_attrs["row"]["label"] for t in study.get_trials(states=(TrialState.COMPLETE,))
    ]
    assert sorted(labels) == ["leave out count", "leave out depth", "traditional MTL"]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 16

    report = run_dst(
        ["report", "--study", "table9-omniglot", "--tracking-uri", mlflow_server.url], tmp_path
    )
    assert report.returncode == 0, report.stderr
    for alphabet in ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"):
        assert alphabet in report.stdout
    for label in labels:
        assert label in report.stdout
