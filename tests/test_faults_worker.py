"""Workers stopped in the middle of a trial: the retried trial resumes from its checkpoint.

The study runs on the real PostgreSQL server and logs to a real ``mlflow server`` process.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
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
from dst._study_file import load_study_file

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


def test_stopped_trial_resumes_from_checkpoint(tmp_path, postgres_database, mlflow_server):
    name = f"resumed-{tmp_path.name}"
    path = write_study(
        tmp_path,
        name,
        '[[enqueue]]\nlabel = "proposed"\n',
        study=f"n_epochs = {N_EPOCHS}",
    )
    storage = postgres_database()
    create_study(load_study_file(path), storage, mlflow_server.url, store_tracking_uri=True)
    checkpoints = tmp_path / "checkpoints"
    worker = ["worker", "--study", name, "--storage", storage]
    worker += ["--heartbeat-interval", "1", "--grace-period", "2"]
    worker += ["--checkpoint-dir", str(checkpoints)]
    checkpoint = checkpoints / name / "trial-0" / "seed-0" / "last.pt"
    polled = optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": NullPool})

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
