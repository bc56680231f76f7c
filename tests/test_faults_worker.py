"""Workers stopped in the middle of a trial: the retried trial resumes from its checkpoint.

The study runs on the real PostgreSQL server and logs to a real ``mlflow server`` process.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.pool import NullPool
from test_study_worker import runs_by_trial, start_dst, wait_for_running_trial, write_study

from dst._report import build_report
from dst._study import create_study
from dst._study_file import Overrides, load_study_file

pytestmark = pytest.mark.slow

N_EPOCHS = 8


def checkpoint_epochs(path: Path) -> int:
    """Return the number of epochs in the checkpoint at ``path``, 0 when there is none."""
    if not path.is_file():
        return 0
    return len(torch.load(path, map_location="cpu", weights_only=True)["records"])


def wait_for_epochs(path: Path, n_epochs: int, process, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, f"worker exited early:\n{log.read_text()[-3000:]}"
        if checkpoint_epochs(path) >= n_epochs:
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint with {n_epochs} epochs:\n{log.read_text()[-3000:]}")


@dataclass
class ResumableStudy:
    worker: list[str]
    """Arguments of ``dst worker`` with a checkpoint folder."""
    seed_dir: Path
    """Checkpoint folder of trial 0, seed 0."""
    storage: optuna.storages.RDBStorage


def create_resumable_study(
    tmp_path: Path,
    name: str,
    enqueue: str,
    n_epochs: int,
    storage_url: str,
    tracking_uri: str,
    n_samples: int | None = None,
) -> ResumableStudy:
    """Create a study of one enqueued row on PostgreSQL, for workers that write checkpoints.

    ``n_samples`` replaces the tiny data set of ``write_study``, for epochs long enough that
    a test can stop a worker between two of them.
    """
    path = write_study(tmp_path, name, f"[[enqueue]]\n{enqueue}\n", study=f"n_epochs = {n_epochs}")
    options = {} if n_samples is None else {"n_samples": n_samples}
    config = load_study_file(path, Overrides(options=options))
    create_study(config, storage_url, tracking_uri, store_tracking_uri=True)
    checkpoints = tmp_path / "checkpoints"
    worker = ["worker", "--study", name, "--storage", storage_url]
    worker += ["--checkpoint-dir", str(checkpoints)]
    return ResumableStudy(
        worker,
        checkpoints / name / "trial-0" / "seed-0",
        optuna.storages.RDBStorage(storage_url, engine_kwargs={"poolclass": NullPool}),
    )


def test_stopped_trial_resumes_from_checkpoint(tmp_path, postgres_database, mlflow_server):
    name = f"resumed-{tmp_path.name}"
    # About 0.3 s per epoch on 2 cores, so each worker is stopped before its last epoch.
    created = create_resumable_study(
        tmp_path,
        name,
        'label = "proposed"',
        N_EPOCHS,
        postgres_database(),
        mlflow_server.url,
        n_samples=1600,
    )
    worker = created.worker + ["--heartbeat-interval", "1", "--grace-period", "2"]
    checkpoint = created.seed_dir / "last.pt"
    polled = created.storage

    # SIGTERM after the first epoch: the run ends KILLED and the worker exits within seconds.
    log_a = tmp_path / "worker-a.log"
    worker_a = start_dst(worker, tmp_path, log_a)
    assert wait_for_running_trial(polled, name, worker_a, log_a) == 0
    wait_for_epochs(checkpoint, 1, worker_a, log_a)
    stopped = time.monotonic()
    worker_a.send_signal(signal.SIGTERM)
    assert worker_a.wait(timeout=30) == 130, log_a.read_text()[-3000:]
    assert time.monotonic() - stopped < 15
    epochs_a = checkpoint_epochs(checkpoint)
    assert 1 <= epochs_a < N_EPOCHS

    # SIGKILL once the retry has trained past the first attempt's checkpoint.
    log_b = tmp_path / "worker-b.log"
    worker_b = start_dst(worker, tmp_path, log_b)
    wait_for_epochs(checkpoint, epochs_a + 1, worker_b, log_b)
    worker_b.kill()
    worker_b.wait()
    epochs_b = checkpoint_epochs(checkpoint)
    assert epochs_a < epochs_b < N_EPOCHS, log_b.read_text()[-3000:]
    assert f"after epoch {epochs_a}" in log_b.read_text()

    log_c = tmp_path / "worker-c.log"
    worker_c = start_dst(worker, tmp_path, log_c)
    assert worker_c.wait(timeout=300) == 0, log_c.read_text()[-3000:]
    text_c = log_c.read_text()
    assert "stopped sending heartbeats" in text_c, text_c[-3000:]
    assert f"resumed from {checkpoint} after epoch {epochs_b}" in text_c, text_c[-3000:]
    assert f"trial 2: MLflow run {mlflow_server.url}/#/experiments/" in text_c
    assert "View run" not in text_c

    study = optuna.load_study(study_name=name, storage=polled)
    trials = {trial.number: trial for trial in study.get_trials()}
    assert Counter(trial.state for trial in trials.values()) == {
        TrialState.FAIL: 2,
        TrialState.COMPLETE: 1,
    }
    assert trials[2].state == TrialState.COMPLETE
    assert trials[2].system_attrs["retry_history"] == [0, 1]

    runs = runs_by_trial(mlflow_server.url, name)
    assert runs[0].info.status == "KILLED"
    assert runs[1].info.status == "FAILED"
    assert "heartbeats" in runs[1].data.tags["dst.fail_reason"]
    assert runs[2].info.status == "FINISHED"
    client = MlflowClient(tracking_uri=mlflow_server.url)
    history = client.get_metric_history(runs[2].info.run_id, "val_avg_error")
    assert sorted(metric.step for metric in history) == list(range(1, N_EPOCHS + 1))
    report = build_report(mlflow_server.url, name)
    assert list(report["row"]) == ["proposed"]


def test_stopped_stl_trial_skips_finished_tasks(tmp_path, postgres_database, mlflow_server):
    name = f"resumed-stl-{tmp_path.name}"
    n_epochs = 4
    created = create_resumable_study(
        tmp_path,
        name,
        'label = "STL"\nscheduler = "stl"',
        n_epochs,
        postgres_database(),
        mlflow_server.url,
    )
    worker, polled = created.worker, created.storage
    first, second = (created.seed_dir / f"stl-task-{index}" / "last.pt" for index in (0, 1))

    # SIGTERM once the second task has trained an epoch, so the first task is finished. The
    # epochs are short, so the second task may have finished too before the signal arrives.
    log_a = tmp_path / "worker-a.log"
    worker_a = start_dst(worker, tmp_path, log_a)
    assert wait_for_running_trial(polled, name, worker_a, log_a) == 0
    wait_for_epochs(second, 1, worker_a, log_a)
    worker_a.send_signal(signal.SIGTERM)
    assert worker_a.wait(timeout=30) == 130, log_a.read_text()[-3000:]
    assert checkpoint_epochs(first) == n_epochs
    epochs_a = checkpoint_epochs(second)
    assert 1 <= epochs_a <= n_epochs

    log_b = tmp_path / "worker-b.log"
    worker_b = start_dst(worker, tmp_path, log_b)
    assert worker_b.wait(timeout=300) == 0, log_b.read_text()[-3000:]
    text_b = log_b.read_text()
    assert f"resumed from {first} after epoch {n_epochs}" in text_b, text_b[-3000:]
    assert f"resumed from {second} after epoch {epochs_a}" in text_b, text_b[-3000:]

    study = optuna.load_study(study_name=name, storage=polled)
    states = [trial.state for trial in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    runs = runs_by_trial(mlflow_server.url, name)
    assert runs[1].info.status == "FINISHED"
    client = MlflowClient(tracking_uri=mlflow_server.url)
    task_runs = client.search_runs(
        [runs[1].info.experiment_id],
        filter_string="tags.`dst.run_type` = 'stl_task' and tags.`optuna.trial_number` = '1'",
    )
    assert len(task_runs) == 5
    for run in task_runs:
        history = client.get_metric_history(run.info.run_id, "val_avg_error")
        assert sorted(metric.step for metric in history) == list(range(1, n_epochs + 1))
