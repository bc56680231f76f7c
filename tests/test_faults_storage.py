"""The study database drops every connection during a study, as on a PostgreSQL restart.

The shared PostgreSQL cluster must keep running for other databases, so the test ends
every backend connection of the study's own database with ``pg_terminate_backend``,
again and again for a few seconds. Clients see the same errors as during a restart.
"""

from __future__ import annotations

import time
from collections import Counter

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from test_study_worker import start_dst, wait_for_running_trial, write_study

from dst._study import create_study
from dst._study_file import load_study_file

pytestmark = pytest.mark.slow

TERMINATE = sqlalchemy.text(
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE datname = :database AND pid <> pg_backend_pid()"
)


def terminate_connections(url: str, seconds: float) -> int:
    """End every other connection to the database at ``url`` every 0.2 s for ``seconds``.

    Returns the number of connections ended.
    """
    database = make_url(url).database
    engine = sqlalchemy.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    n_terminated = 0
    deadline = time.monotonic() + seconds
    try:
        with engine.connect() as connection:
            while time.monotonic() < deadline:
                n_terminated += connection.execute(TERMINATE, {"database": database}).scalar()
                time.sleep(0.2)
    finally:
        engine.dispose()
    return n_terminated


def test_workers_survive_dropped_connections(tmp_path, postgres_database, mlflow_server):
    name = f"reconnect-{tmp_path.name}"
    path = write_study(
        tmp_path,
        name,
        '[[enqueue]]\nlabel = "mtl"\nscheduler = "mtl"\n[[enqueue]]\nlabel = "proposed"\n',
        study="n_epochs = 4",
    )
    storage = postgres_database()
    create_study(load_study_file(path), storage, mlflow_server.url, store_tracking_uri=True)
    worker = ["worker", "--study", name, "--storage", storage]
    worker += ["--heartbeat-interval", "1", "--grace-period", "30"]
    log = tmp_path / "worker.log"
    process = start_dst(worker, tmp_path, log)
    polled = optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": NullPool})
    wait_for_running_trial(polled, name, process, log)

    n_terminated = terminate_connections(storage, 5.0)

    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert n_terminated > 0
    study = optuna.load_study(study_name=name, storage=polled)
    states = Counter(trial.state for trial in study.get_trials())
    assert states == {TrialState.COMPLETE: 2}, log.read_text()[-3000:]
