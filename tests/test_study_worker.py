"""Workers: pruning, divergence, interrupted and dead workers, the SQLite defaults and the
one-line errors of the command line.

Tiny ``shapes`` studies (96 images of 16x16 pixels) keep each training run to seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.pool import NullPool

from dst._report import build_report
from dst._study import WorkerSettings, create_study, run_worker
from dst._study_file import Overrides, load_study_file
from dst.cli import main

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def write_study(folder: Path, name: str, body: str, study: str = "n_epochs = 2") -> Path:
    """Write a tiny shapes study file; ``study`` contains more keys of its [study] table."""
    header = f"""
        [study]
        name = "{name}"
        {study}

        [experiment]
        name = "shapes"
        [experiment.options]
        n_samples = 96
        image_size = 16
        width = 4
    """
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(header) + textwrap.dedent(body))
    return path


def dst_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DST_STORAGE", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def start_dst(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "dst", *args],
        cwd=cwd,
        env=dst_env(),
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
    )


def runs_by_trial(tracking_uri: str, study_name: str) -> dict[int, object]:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    trials = [run for run in runs if run.data.tags.get("dst.run_type") == "trial"]
    return {int(run.data.tags["optuna.trial_number"]): run for run in trials}


def wait_for_running_trial(
    storage: optuna.storages.RDBStorage, study_name: str, process: subprocess.Popen, log: Path
) -> int:
    """Return the number of the first RUNNING trial that has an MLflow run."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, f"worker exited early:\n{log.read_text()[-3000:]}"
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            if "mlflow_run_id" in trial.user_attrs:
                return trial.number
        time.sleep(0.2)
    raise AssertionError(f"no trial started:\n{log.read_text()[-3000:]}")


def test_median_pruner_prunes_worse_trial(tmp_path):
    path = write_study(
        tmp_path,
        "pruned",
        """
        [pruner]
        name = "median"
        n_startup_trials = 1
        n_warmup_steps = 0

        [[enqueue]]
        label = "proposed"
        """,
        study="n_trials = 2\n        n_epochs = 2",
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_study_file(path)
    create_study(config, storage, tracking, store_tracking_uri=True)
    study = optuna.load_study(study_name="pruned", storage=storage)
    # A finished trial with zero error at every step makes any real trial worse than the median.
    study.add_trial(optuna.trial.create_trial(value=0.0, intermediate_values={1: 0.0, 2: 0.0}))

    assert run_worker(WorkerSettings("pruned", storage)) == 1

    trials = {trial.number: trial for trial in study.get_trials()}
    assert trials[0].state == TrialState.PRUNED
    assert trials[0].user_attrs["row"]["label"] == "proposed"
    run = runs_by_trial(tracking, "pruned")[0]
    assert run.info.status == "KILLED"
    assert trials[0].user_attrs["mlflow_run_id"] == run.info.run_id


def test_diverged_trials_fail_and_study_goes_on(tmp_path):
    path = write_study(
        tmp_path,
        "diverged",
        """
        [train]
        lr = 1e12

        [[enqueue]]
        label = "mtl"
        scheduler = "mtl"

        [[enqueue]]
        label = "proposed"
        """,
        study="n_epochs = 3",
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    create_study(load_study_file(path), storage, tracking, store_tracking_uri=True)

    assert run_worker(WorkerSettings("diverged", storage)) == 2

    study = optuna.load_study(study_name="diverged", storage=storage)
    runs = runs_by_trial(tracking, "diverged")
    for trial in study.get_trials():
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs["fail_reason"].startswith("DivergedError: loss of task")
        run = runs[trial.number]
        assert run.info.status == "FAILED"
        assert run.data.tags["dst.fail_reason"] == trial.user_attrs["fail_reason"]


def test_interrupted_and_dead_workers_are_retried(tmp_path, postgres_database):
    path = write_study(
        tmp_path,
        "retried",
        """
        [[enqueue]]
        label = "mtl"
        scheduler = "mtl"

        [[enqueue]]
        label = "proposed"
        """,
        study="n_epochs = 8",
    )
    storage = postgres_database()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # About 0.3 s per epoch on 2 cores, so a trial still runs when the test stops its worker.
    config = load_study_file(path, Overrides(options={"n_samples": 1600}))
    create_study(config, storage, tracking, store_tracking_uri=True)
    worker = ["worker", "--study", "retried", "--storage", storage]
    fast_heartbeat = ["--heartbeat-interval", "1", "--grace-period", "2"]

    # SIGTERM: the trial ends interrupted and is queued again at once.
    log_a = tmp_path / "worker-a.log"
    worker_a = start_dst(worker, tmp_path, log_a)
    # One storage for every look, so polling does not open a connection pool per look.
    polled = optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": NullPool})
    interrupted = wait_for_running_trial(polled, "retried", worker_a, log_a)
    worker_a.send_signal(signal.SIGTERM)
    assert worker_a.wait(timeout=60) == 130, log_a.read_text()[-3000:]
    assert "interrupted" in log_a.read_text()

    # SIGKILL: the trial stops sending heartbeats; the next worker fails and retries it.
    log_b = tmp_path / "worker-b.log"
    worker_b = start_dst([*worker, *fast_heartbeat], tmp_path, log_b)
    killed = wait_for_running_trial(polled, "retried", worker_b, log_b)
    worker_b.kill()
    worker_b.wait()

    log_c = tmp_path / "worker-c.log"
    worker_c = start_dst([*worker, *fast_heartbeat], tmp_path, log_c)
    assert worker_c.wait(timeout=300) == 0, log_c.read_text()[-3000:]
    assert "stopped sending heartbeats" in log_c.read_text(), log_c.read_text()[-3000:]

    study = optuna.load_study(study_name="retried", storage=polled)
    trials = {trial.number: trial for trial in study.get_trials()}
    logs = "\n".join(log.read_text()[-2000:] for log in (log_a, log_b, log_c))
    states = Counter(trial.state for trial in trials.values())
    assert states == {TrialState.FAIL: 2, TrialState.COMPLETE: 2}, logs
    assert trials[interrupted].state == TrialState.FAIL
    assert trials[killed].state == TrialState.FAIL
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["row"]["label"] for t in complete) == ["mtl", "proposed"]
    assert all("fail_reason" not in t.user_attrs for t in complete)

    runs = runs_by_trial(tracking, "retried")
    assert runs[interrupted].info.status == "KILLED"
    assert "WorkerStopped" in runs[interrupted].data.tags["dst.fail_reason"]
    assert runs[killed].info.status == "FAILED"
    assert "heartbeats" in runs[killed].data.tags["dst.fail_reason"]
    for trial in complete:
        assert runs[trial.number].info.status == "FINISHED"
        assert runs[trial.number].info.run_id == trial.user_attrs["mlflow_run_id"]
    report = build_report(tracking, "retried")
    assert sorted(report["row"]) == ["mtl", "proposed"]


def test_study_run_uses_sqlite_defaults(tmp_path):
    path = write_study(
        tmp_path,
        "laptop",
        """
        [search]
        lambdas = true

        [[enqueue]]
        label = "traditional MTL"
        scheduler = "mtl"

        [[enqueue]]
        label = "STL"
        scheduler = "stl"
        """,
        study="n_trials = 3\n        n_epochs = 2",
    )
    result = subprocess.run(
        [sys.executable, "-m", "dst", "study", "run", path.name, "--checkpoint-dir", "ckpt"],
        cwd=tmp_path,
        env=dst_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "dst-studies.db").is_file()
    assert (tmp_path / "mlflow.db").is_file()
    assert (tmp_path / "ckpt" / "laptop" / "trial-0" / "seed-0" / "last.pt").is_file()
    for label in ("traditional MTL", "STL", "trial 2"):
        assert label in result.stdout

    study = optuna.load_study(
        study_name="laptop", storage="sqlite:///" + str(tmp_path / "dst-studies.db")
    )
    assert [trial.state for trial in study.get_trials()] == [TrialState.COMPLETE] * 3
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("laptop")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    stl_trial = next(r for r in runs if r.data.tags.get("dst.row_label") == "STL")
    stl_runs = [r for r in runs if r.data.tags.get("dst.run_type") == "stl_task"]
    assert {r.data.tags["mlflow.parentRunId"] for r in stl_runs} == {stl_trial.info.run_id}
    assert sorted(r.data.tags["dst.stl_task"] for r in stl_runs) == sorted(
        ["kind", "filled", "corners", "pose", "denoising"]
    )
    for run in stl_runs:
        key = run.data.tags["dst.stl_task"]
        assert set(run.data.metrics) >= {f"test_error_at_best/{key}", "best_epoch"}
    assert stl_trial.data.metrics["best_val_avg_error"] == pytest.approx(
        study.get_trials()[1].value
    )


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(args)
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("dst ")]
    return status, lines[-1] if lines else error


def test_unreachable_storage_names_host_and_port(capsys):
    port = free_port()
    storage = f"postgresql+psycopg://postgres@127.0.0.1:{port}/optuna"
    status, message = run_cli(["worker", "--study", "x", "--storage", storage], capsys)
    assert status == 2
    assert f"cannot connect to the study storage at 127.0.0.1:{port}" in message


def test_unknown_study_lists_existing_ones(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=storage, study_name="other-study")
    status, message = run_cli(["worker", "--study", "missing", "--storage", storage], capsys)
    assert status == 2
    assert "study 'missing' not found" in message
    assert "existing studies: other-study" in message
    status, message = run_cli(["worker", "--study", "other-study", "--storage", storage], capsys)
    assert status == 2
    assert "was not created by 'dst study create'" in message


def test_missing_storage_file_writes_nothing(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'missing.db'}"
    status, message = run_cli(["worker", "--study", "x", "--storage", storage], capsys)
    assert status == 2
    assert "does not exist; run 'dst study create FILE' first" in message
    assert list(tmp_path.iterdir()) == []


def test_dead_tracking_server_writes_nothing(tmp_path, capsys):
    path = write_study(tmp_path, "dead", "[[enqueue]]\nlabel = 'mtl'\nscheduler = 'mtl'\n")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracking = f"http://127.0.0.1:{free_port()}"
    args = ["study", "create", str(path), "--storage", storage, "--tracking-uri", tracking]
    status, message = run_cli(args, capsys)
    assert status == 2
    assert f"MLflow tracking server {tracking} does not respond" in message
    assert list(tmp_path.iterdir()) == [path]


def test_shared_database_is_rejected(tmp_path, capsys):
    path = write_study(tmp_path, "shared", "[[enqueue]]\nlabel = 'mtl'\nscheduler = 'mtl'\n")
    url = f"sqlite:///{tmp_path / 'both.db'}"
    args = ["study", "create", str(path), "--storage", url, "--tracking-uri", url]
    status, message = run_cli(args, capsys)
    assert status == 2
    assert "name the same database" in message
    assert list(tmp_path.iterdir()) == [path]


def test_create_is_idempotent_and_rejects_changed_config(tmp_path, capsys):
    path = write_study(
        tmp_path,
        "again",
        "[[enqueue]]\nlabel = 'mtl'\nscheduler = 'mtl'\n[[enqueue]]\nlabel = 'dst'\n",
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    service = ["--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for _ in range(2):
        assert main(["study", "create", str(path), *service]) == 0
    study = optuna.load_study(study_name="again", storage=storage)
    assert [trial.user_attrs["row"]["label"] for trial in study.get_trials()] == ["mtl", "dst"]
    capsys.readouterr()
    changed = ["study", "create", str(path), *service, "--n-epochs", "3"]
    status, message = run_cli(changed, capsys)
    assert status == 2
    assert "study 'again' already exists with n_epochs = 2, not 3" in message

    # Optuna's own log handler writes to the process's stderr, which capsys does not capture.
    result = subprocess.run(
        [sys.executable, "-m", "dst", *changed],
        cwd=tmp_path,
        env=dst_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_omniglot_study_needs_data_dir(tmp_path, capsys):
    study_file = REPO / "studies" / "table9-omniglot.toml"
    service = ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    service += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    status, message = run_cli(["study", "create", str(study_file), *service], capsys)
    assert status == 2
    assert "reads its data from a folder; pass --data-dir PATH" in message
    missing = ["--data-dir", str(tmp_path / "no-such.zip")]
    status, message = run_cli(["study", "create", str(study_file), *service, *missing], capsys)
    assert status == 2
    assert "no-such.zip' of study 'table9-omniglot' does not exist" in message
    assert list(tmp_path.iterdir()) == []
