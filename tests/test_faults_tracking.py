"""The MLflow tracking server stops during a trial: epochs are kept on disk, none is lost.

Each test starts its own ``mlflow server`` process and kills and restarts it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.pool import NullPool
from test_faults_worker import checkpoint_epochs, wait_for_epochs
from test_study_worker import dst_env, runs_by_trial, start_dst, write_study

from dst._study import create_study
from dst._study_file import load_study_file

pytestmark = pytest.mark.slow

N_EPOCHS = 8


def epoch_steps(tracking_uri: str, run_id: str) -> list[int]:
    client = MlflowClient(tracking_uri=tracking_uri)
    history = client.get_metric_history(run_id, "val_avg_error")
    return [metric.step for metric in sorted(history, key=lambda m: (m.timestamp, m.step))]


def start_study(tmp_path, name: str, storage: str, tracking_uri: str) -> list[str]:
    path = write_study(
        tmp_path, name, '[[enqueue]]\nlabel = "proposed"\n', study=f"n_epochs = {N_EPOCHS}"
    )
    create_study(load_study_file(path), storage, tracking_uri, store_tracking_uri=True)
    worker = ["worker", "--study", name, "--storage", storage]
    worker += ["--checkpoint-dir", str(tmp_path / "checkpoints")]
    return [*worker, "--spool-dir", str(tmp_path / "spool")]


def test_epochs_reach_restarted_server(tmp_path, postgres_database, start_mlflow_server):
    server = start_mlflow_server()
    storage = postgres_database()
    worker = start_study(tmp_path, "outage", storage, server.url)
    checkpoint = tmp_path / "checkpoints" / "outage" / "trial-0" / "seed-0" / "last.pt"
    log = tmp_path / "worker.log"
    process = start_dst(worker, tmp_path, log)

    wait_for_epochs(checkpoint, 1, process, log)
    server.stop(signal.SIGKILL)
    epochs_at_stop = checkpoint_epochs(checkpoint)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "spool").glob("*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list((tmp_path / "spool").glob("*.jsonl")), log.read_text()[-3000:]
    time.sleep(2)
    server.start()

    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "does not respond" in text
    assert "kept epoch" in text
    assert "responds again" in text
    assert list((tmp_path / "spool").glob("*.jsonl")) == []
    assert epochs_at_stop < N_EPOCHS

    polled = optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": NullPool})
    study = optuna.load_study(study_name="outage", storage=polled)
    assert [trial.state for trial in study.get_trials()] == [TrialState.COMPLETE]
    run = runs_by_trial(server.url, "outage")[0]
    assert run.info.status == "FINISHED"
    assert epoch_steps(server.url, run.info.run_id) == list(range(1, N_EPOCHS + 1))


def test_outage_limit_stops_worker_for_replay(tmp_path, postgres_database, start_mlflow_server):
    server = start_mlflow_server()
    storage = postgres_database()
    worker = start_study(tmp_path, "given-up", storage, server.url)
    checkpoint = tmp_path / "checkpoints" / "given-up" / "trial-0" / "seed-0" / "last.pt"
    log = tmp_path / "worker.log"
    process = start_dst([*worker, "--outage-limit", "2"], tmp_path, log)

    wait_for_epochs(checkpoint, 1, process, log)
    server.stop(signal.SIGKILL)
    assert process.wait(timeout=120) == 1, log.read_text()[-3000:]
    last_line = log.read_text().strip().splitlines()[-1]
    spool_files = list((tmp_path / "spool").glob("*.jsonl"))
    assert len(spool_files) == 1, log.read_text()[-3000:]
    assert last_line.startswith("dst worker: error: MLflow server")
    assert f"dst replay {spool_files[0]}" in last_line

    polled = optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": NullPool})
    study = optuna.load_study(study_name="given-up", storage=polled)
    states = [trial.state for trial in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]

    server.start()
    run = runs_by_trial(server.url, "given-up")[0]
    steps_before = epoch_steps(server.url, run.info.run_id)
    replay = subprocess.run(
        [sys.executable, "-m", "dst", "replay", str(spool_files[0])],
        cwd=tmp_path,
        env=dst_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stderr
    # One line of dst's own; MLflow prints no "View run" lines.
    assert len(replay.stdout.splitlines()) == 1, replay.stdout
    assert replay.stdout.startswith("sent "), replay.stdout
    assert not spool_files[0].exists()
    steps_after = epoch_steps(server.url, run.info.run_id)
    assert len(steps_after) > len(steps_before)
    assert steps_after == list(range(1, len(steps_after) + 1))
    run = runs_by_trial(server.url, "given-up")[0]
    assert run.info.status == "FAILED"
    assert "TrackingUnavailable" in run.data.tags["dst.fail_reason"]
    assert f"sent later by 'dst replay {spool_files[0].name}'" in run.data.tags["dst.fail_reason"]
