"""Optuna storage: URLs, connection checks, the study lock and the bounded connection pool.

Every storage call and the study lock retry with backoff when the database connection
drops, so workers outlive a database restart of up to about 15 s.

Each process opens the storage with ``pool_pre_ping`` and a pool of :data:`POOL_SIZE`
connections plus :data:`MAX_OVERFLOW` overflow ones. While it holds the study lock it opens
one more connection for the lock itself, a PostgreSQL advisory lock. On SQLite the lock is
an ``flock`` on ``<database>.lock`` and needs no connection. So a worker opens at most
``POOL_SIZE + MAX_OVERFLOW + 1`` = 4 connections to PostgreSQL.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from optuna.exceptions import ExperimentalWarning, StorageInternalError
from optuna.storages import RDBStorage
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from dst._errors import UsageError

_logger = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///dst-studies.db"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STORAGE_ENV = "DST_STORAGE"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"

POOL_SIZE = 2
"""Pooled connections per process: the main thread and the heartbeat thread."""
MAX_OVERFLOW = 1
"""Connections above the pool, for a moment when both threads and a callback overlap."""

_CONNECT_TIMEOUT_S = 5
_SUPPORTED_BACKENDS = ("postgresql", "sqlite")


def resolve_storage_url(value: str | None) -> str:
    """Return ``--storage``, else ``$DST_STORAGE``, else the SQLite file in the working dir."""
    url = value or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    return normalize_database_url(url, "--storage / DST_STORAGE")


def resolve_tracking_uri(value: str | None, stored: str | None = None) -> str:
    """Return ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``stored``, else SQLite."""
    return value or os.environ.get(TRACKING_URI_ENV) or stored or DEFAULT_TRACKING_URI


def normalize_database_url(url: str, source: str) -> str:
    """Return ``url`` with the psycopg 3 driver when it names PostgreSQL without a driver.

    SQLAlchemy's default PostgreSQL driver is psycopg2, which this project does not need.
    """
    parsed = _parse_url(url, source)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in _SUPPORTED_BACKENDS:
        raise UsageError(
            f"unsupported study storage {display_url(parsed)!r} from {source}; use"
            " postgresql+psycopg://USER@HOST:PORT/DB or sqlite:///FILE.db"
        )
    return parsed.render_as_string(hide_password=False)


def _parse_url(url: str, source: str) -> URL:
    try:
        return make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise UsageError(
            f"invalid database URL {url!r} from {source}; expected a URL such as"
            " postgresql+psycopg://postgres@127.0.0.1:5432/optuna or sqlite:///dst-studies.db"
        ) from None


def display_url(url: URL | str) -> str:
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.render_as_string(hide_password=True)


def check_distinct_databases(storage_url: str, tracking_uri: str) -> None:
    """Raise UsageError when Optuna and MLflow would share one database.

    Both keep their schema version in an ``alembic_version`` table, so one database cannot
    hold both.
    """
    try:
        tracking = make_url(tracking_uri)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return
    if tracking.get_backend_name() not in ("postgresql", "sqlite", "mysql", "mssql"):
        return
    if _database_identity(make_url(storage_url)) == _database_identity(tracking):
        raise UsageError(
            f"the Optuna storage and the MLflow tracking URI name the same database"
            f" ({display_url(storage_url)}); give MLflow its own database, such as"
            " sqlite:///mlflow.db or .../mlflow on the same server"
        )


def _database_identity(url: URL) -> tuple[str, str | None, int | None, str | None]:
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database or ""
        path = str(Path(database).resolve()) if database not in ("", ":memory:") else database
        return backend, None, None, path
    port = url.port or (5432 if backend == "postgresql" else None)
    return backend, url.host or "localhost", port, url.database


def check_storage(url: str, *, must_exist: bool) -> None:
    """Raise UsageError unless the storage at ``url`` can be used, writing nothing.

    A SQLite file must exist when ``must_exist`` is set, else its folder must. A server
    must accept a connection; the message names its host and port.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_path(parsed, must_exist)
        return
    engine = sqlalchemy.create_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": _CONNECT_TIMEOUT_S}
    )
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        # A failed connection carries no SQLSTATE in psycopg 3, so match the server's
        # (English) message.
        if f'database "{parsed.database}" does not exist' in reason:
            user = f" -U {parsed.username}" if parsed.username else ""
            raise UsageError(
                f"the study storage at {parsed.host}:{parsed.port or 5432} has no database"
                f" {parsed.database!r}; create it with 'createdb -h {parsed.host}"
                f" -p {parsed.port or 5432}{user} {parsed.database}' or fix --storage /"
                " DST_STORAGE"
            ) from None
        raise UsageError(
            f"cannot connect to the study storage at {parsed.host}:{parsed.port or 5432}"
            f" (database {parsed.database!r}): {reason}; start the server or fix --storage /"
            " DST_STORAGE"
        ) from None
    finally:
        engine.dispose()


def _check_sqlite_path(url: URL, must_exist: bool) -> None:
    database = url.database or ""
    if database in ("", ":memory:"):
        raise UsageError(
            f"in-memory SQLite storage {display_url(url)!r} is lost when the process ends;"
            " give a file, such as sqlite:///dst-studies.db"
        )
    path = Path(database)
    if must_exist and not path.is_file():
        raise UsageError(
            f"study storage file {database!r} does not exist; run 'dst study create FILE'"
            " first, or fix --storage / DST_STORAGE"
        )
    if not path.resolve().parent.is_dir():
        raise UsageError(
            f"folder of the study storage file {database!r} does not exist; create it or"
            " fix --storage / DST_STORAGE"
        )


@contextmanager
def study_lock(url: str, study_name: str) -> Iterator[None]:
    """Hold a lock on ``study_name`` shared by every process that uses the storage ``url``.

    PostgreSQL: a session advisory lock keyed by the study name, on its own connection.
    SQLite: ``flock`` on ``<database>.lock``, which works between processes of one machine,
    the only machines that can share a SQLite file.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        with _file_lock(Path(f"{parsed.database}.lock")):
            yield
        return
    key = int.from_bytes(hashlib.sha256(f"dst.study:{study_name}".encode()).digest()[:8], "big")
    key -= 1 << 63  # into PostgreSQL's signed bigint range
    engine = sqlalchemy.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        connection = retry_on_disconnect("study_lock", lambda: _advisory_lock(engine, key))
        try:
            yield
        finally:
            _advisory_unlock(connection, key, study_name)
    finally:
        engine.dispose()


def _advisory_lock(engine: sqlalchemy.Engine, key: int) -> sqlalchemy.Connection:
    connection = engine.connect()
    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
    except BaseException:
        connection.close()
        raise
    return connection


def _advisory_unlock(connection: sqlalchemy.Connection, key: int, study_name: str) -> None:
    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    except sqlalchemy.exc.SQLAlchemyError as error:
        # PostgreSQL drops a session's advisory locks with its connection.
        _logger.warning("lock of study %s ended with its connection: %s", study_name, error)
    finally:
        connection.close()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


RECONNECT_ATTEMPTS = 6
"""Tries of one storage call when the database connection drops: 1 + 5 retries."""
_RECONNECT_FIRST_DELAY_S = 0.5
_RECONNECT_MAX_DELAY_S = 8.0
_RETRIED_METHODS = (
    "create_new_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "get_best_trial",
    "record_heartbeat",
    "_get_stale_trial_ids",
)


def _is_disconnect(error: BaseException) -> bool:
    """Return whether ``error`` is a dropped or refused database connection."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, sqlalchemy.exc.OperationalError):
            return True
        cause = cause.__cause__
    return False


def retry_on_disconnect(name: str, call: Callable[[], Any]) -> Any:
    """Run ``call``, retrying with exponential backoff while the database connection drops.

    Raises the last error after :data:`RECONNECT_ATTEMPTS` tries (about 15 s of waiting).
    """
    delay = _RECONNECT_FIRST_DELAY_S
    for attempt in range(1, RECONNECT_ATTEMPTS + 1):
        try:
            return call()
        except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as error:
            if attempt == RECONNECT_ATTEMPTS or not _is_disconnect(error):
                raise
            _logger.warning(
                "study storage call %s lost its connection (attempt %d of %d): %s; retrying"
                " in %.1f s",
                name,
                attempt,
                RECONNECT_ATTEMPTS,
                str(error.__cause__ or error).splitlines()[0],
                delay,
            )
            time.sleep(delay)
            delay = min(2 * delay, _RECONNECT_MAX_DELAY_S)
    raise AssertionError("unreachable")


class ReconnectingStorage(RDBStorage):
    """Optuna's RDB storage whose calls survive a database restart.

    The engine pre-pings each pooled connection. A call whose connection drops while it
    runs is retried by :func:`retry_on_disconnect`.

    NOTE: a write whose commit reached the server just before the connection dropped runs
    again on retry. Optuna's writes are updates of one row, so a repeat is harmless, except
    ``create_new_trial``, which could add a second trial.
    """


def _wrap_retried(method_name: str) -> None:
    method = getattr(RDBStorage, method_name)

    @functools.wraps(method)
    def retried(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retry_on_disconnect(method_name, lambda: method(self, *args, **kwargs))

    setattr(ReconnectingStorage, method_name, retried)


for _method_name in _RETRIED_METHODS:
    _wrap_retried(_method_name)


def open_storage(
    url: str,
    *,
    create_tables: bool,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    stale_trial_callback: Any = None,
) -> RDBStorage:
    """Open Optuna's RDB storage with pre-ping and the bounded pool of the module docstring."""
    engine_kwargs: dict[str, Any] = {
        "pool_pre_ping": True,
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
    }
    if make_url(url).get_backend_name() == "sqlite":
        # Wait for a writer in another process instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return ReconnectingStorage(
            url,
            engine_kwargs=engine_kwargs,
            skip_table_creation=not create_tables,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=stale_trial_callback,
        )
