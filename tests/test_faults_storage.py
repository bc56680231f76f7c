"""The study database drops every connection during a study, as on a PostgreSQL restart.

The shared PostgreSQL cluster must keep running for other databases, so the test refuses
new connections to the study's own database (``ALLOW_CONNECTIONS false``) and ends its
connections with ``pg_terminate_backend`` for a few seconds. Clients see the same errors as
during a restart.
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
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :database"
)


def restart_database(url: str, seconds: float) -> int:
    """Refuse and end every connection to the database at ``url`` for ``seconds``.

    ``ALLOW_CONNECTIONS false`` makes new connections fail, as while a server restarts.
    Returns the number of connections ended.
    """
    database = make_url(url).database
    admin_url = make_url(url).set(database="postgres")
    engine = sqlalchemy.create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    n_terminated = 0
    try:
        with engine.connect() as connection:
            connection.execute(
                sqlalchemy.text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            )
            try:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    result = connection.execute(TERMINATE, {"database": database})
                    n_terminated += result.scalar()
                    time.sleep(0.2)
            finally:
                connection.execute(
                    sqlalchemy.text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
                )
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

    n_terminated = restart_database(storage, 3.0)

    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert n_terminated > 0
    study = optuna.load_study(study_name=name, storage=polled)
    states = Counter(trial.state for trial in study.get_trials())
    assert states == {TrialState.COMPLETE: 2}, log.read_text()[-3000:]
    assert "lost its connection" in log.read_text()
