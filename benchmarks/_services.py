"""Local services and measuring aids shared by the benchmark scripts.

Importing this module puts the checkout's root first on ``sys.path``, so every script measures
the ``dst`` and ``experiments`` packages of this checkout even where another copy is
installed. It starts ``mlflow server`` processes on free 127.0.0.1 ports, each in its own
process group, creates and drops PostgreSQL databases, counts the HTTP requests that MLflow's
REST client sends and polls ``pg_stat_activity`` for the connections to a database.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import sqlalchemy

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dst._errors import UsageError  # noqa: E402 - needs the checkout's root on sys.path

_logger = logging.getLogger(__name__)

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
POSTGRES_ENV = "DST_BENCHMARK_POSTGRES"
_SERVER_START_TIMEOUT_S = 180.0
_SERVER_STOP_TIMEOUT_S = 10.0


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--tracking-uri``, ``--backend`` and ``--postgres`` to a script's parser."""
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking server to log to (default: start a local mlflow server for"
        " this run and stop it at the end)",
    )
    parser.add_argument(
        "--backend",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="backend store of the local mlflow server: a fresh PostgreSQL database that is"
        " dropped at the end, or a SQLite file in a temporary folder (default: postgres)",
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES),
        help="SQLAlchemy URL of the PostgreSQL server, without a database name (default:"
        f" ${POSTGRES_ENV}, else {DEFAULT_POSTGRES})",
    )


def run_script(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Run a script's ``main`` and exit; a UsageError becomes one stderr line and status 2."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        main(None)
    except UsageError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)


def parse_int_list(text: str, option: str) -> list[int]:
    """Return the positive integers of a comma-separated ``text``, such as ``1,2,4,8``."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(
            f"invalid {option} {text!r}; use positive integers separated by commas, such as 1,2,4"
        )
    return values


def check_positive(value: int, option: str) -> int:
    """Return ``value``, raising UsageError unless it is at least 1."""
    if value < 1:
        raise UsageError(f"{option} must be at least 1, got {value}")
    return value


# PostgreSQL databases.


def create_database(server: str, prefix: str) -> str:
    """Create an empty database named ``<prefix>_<random>`` and return its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine(server)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as error:
        raise UsageError(
            f"cannot create a database on PostgreSQL at {server}: {error.orig}; start the"
            f" server or give --postgres / ${POSTGRES_ENV}"
        ) from None
    finally:
        engine.dispose()
    return f"{server}/{name}"


def drop_database(url: str) -> None:
    """Drop the database at ``url``, ending the connections that remain to it."""
    server, name = url.rsplit("/", 1)
    engine = _admin_engine(server)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@contextmanager
def temporary_database(server: str, prefix: str) -> Iterator[str]:
    """Create a database for the duration of the ``with`` block, then drop it."""
    url = create_database(server, prefix)
    try:
        yield url
    finally:
        drop_database(url)


def _admin_engine(server: str) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(
        f"{server}/postgres",
        isolation_level="AUTOCOMMIT",
        poolclass=sqlalchemy.pool.NullPool,
    )


# The MLflow server.


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no process listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    """An ``mlflow server`` process group on 127.0.0.1 with one uvicorn worker."""

    backend_uri: str
    artifacts_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.artifacts_dir.parent / f"mlflow-server-{self.port}.log"

    def start(self) -> None:
        """Start the server in its own process group and wait until ``/health`` responds."""
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see its log {self.log_path}")
            if self.is_healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"mlflow server did not respond within {_SERVER_START_TIMEOUT_S:.0f} s; see its"
            f" log {self.log_path}"
        )

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the whole process group: the server and the workers it started."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=_SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        # The server's worker processes can outlive a group leader that exits first.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class Tracking:
    """An MLflow tracking server to log to.

    Attributes:
        url: The server's tracking URI.
        database: Name of its PostgreSQL database when this process started the server on
            one, else None.
    """

    url: str
    database: str | None = None


@contextmanager
def mlflow_tracking(args: argparse.Namespace) -> Iterator[Tracking]:
    """Yield ``--tracking-uri``, or a local server started for the block and then stopped.

    MLflow's client stops printing a link per ended run for the rest of the process.
    """
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if args.tracking_uri:
        yield Tracking(args.tracking_uri)
        return
    with tempfile.TemporaryDirectory(prefix="dst-benchmark-") as folder:
        artifacts = Path(folder) / "mlartifacts"
        artifacts.mkdir()
        if args.backend == "sqlite":
            with _running_server(f"sqlite:///{folder}/mlflow.db", artifacts) as url:
                yield Tracking(url)
            return
        with temporary_database(args.postgres, "dst_benchmark_mlflow") as backend_uri:
            with _running_server(backend_uri, artifacts) as url:
                yield Tracking(url, backend_uri.rsplit("/", 1)[1])


@contextmanager
def _running_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    server = MlflowServer(backend_uri=backend_uri, artifacts_dir=artifacts)
    print(f"starting mlflow server on {server.url} (backend {backend_uri.split(':')[0]})")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def subprocess_environment(threads: int | None = None) -> dict[str, str]:
    """Return this process's environment with the checkout's root first on PYTHONPATH.

    With ``threads``, OpenMP and MKL, and so torch, use that many threads in the child.
    """
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environment = {
        **os.environ,
        "PYTHONPATH": python_path,
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }
    if threads is not None:
        environment["OMP_NUM_THREADS"] = environment["MKL_NUM_THREADS"] = str(threads)
    return environment


# Measuring aids.


class RequestCounter:
    """Number of HTTP requests sent through ``requests.Session`` since the patch began."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


@contextmanager
def count_http_requests() -> Iterator[RequestCounter]:
    """Count every ``requests.Session.request`` call in this process during the block.

    MLflow's REST client sends each tracking call through ``requests.Session.request``
    (``mlflow/utils/request_utils.py`` in MLflow 3.17), so the count is the number of
    requests that reach the tracking server, retries included.
    """
    counter = RequestCounter()
    original = requests.Session.request

    def counted(self: requests.Session, *args: Any, **kwargs: Any) -> requests.Response:
        counter.add()
        return original(self, *args, **kwargs)

    requests.Session.request = counted  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        requests.Session.request = original  # type: ignore[method-assign]


class ConnectionWatcher:
    """Polls ``pg_stat_activity`` on a thread and keeps the peak connections per database.

    Args:
        server: SQLAlchemy URL of the PostgreSQL server, without a database name.
        databases: Names of the databases to watch.
        interval: Seconds between polls.
    """

    def __init__(self, server: str, databases: Sequence[str], interval: float = 0.1) -> None:
        self.databases = list(databases)
        self.interval = interval
        self.peaks = dict.fromkeys(self.databases, 0)
        self.n_polls = 0
        self._engine = sqlalchemy.create_engine(
            f"{server}/postgres", pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT"
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="pg-connections", daemon=True)

    def __enter__(self) -> ConnectionWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._engine.dispose()

    def _poll(self) -> None:
        query = sqlalchemy.text(
            "SELECT datname, count(*) FROM pg_stat_activity"
            " WHERE datname = ANY(:names) GROUP BY datname"
        )
        with self._engine.connect() as connection:
            while not self._stop.is_set():
                rows = connection.execute(query, {"names": self.databases}).all()
                for name, count in rows:
                    self.peaks[name] = max(self.peaks[name], int(count))
                self.n_polls += 1
                self._stop.wait(self.interval)


@dataclass(frozen=True)
class Reading:
    """Wall-clock and CPU seconds: a point in time, or the difference of two points.

    CPU time is ``time.process_time``, the CPU seconds of every thread of this process. It
    leaves out the time spent waiting for other processes (an MLflow server, a database, or
    other programs that share the cores), so it stays comparable on a loaded machine.
    """

    wall: float
    cpu: float

    @classmethod
    def now(cls) -> Reading:
        return cls(time.perf_counter(), time.process_time())

    def __sub__(self, other: Reading) -> Reading:
        return Reading(self.wall - other.wall, self.cpu - other.cpu)


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Return the median of the ratios of paired values, NaN when there are none."""
    pairs = zip(numerators, denominators, strict=True)
    return median([numerator / denominator for numerator, denominator in pairs])


def median(values: Sequence[float]) -> float:
    """Return the median of ``values``, NaN when there are none."""
    return statistics.median(values) if values else float("nan")


def describe_machine() -> str:
    """Return a one-line description of the CPU, its cores, the load and the versions."""
    import torch

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{_cpu_model()}, {os.cpu_count()} cores, load average {load}; Python"
        f" {platform.python_version()}, torch {torch.__version__} with"
        f" {torch.get_num_threads()} threads"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_header(title: str, script: str, argv: Sequence[str] | None) -> None:
    """Print the benchmark's title, the machine and the command line that reproduces it."""
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"== {title}")
    print(f"machine: {describe_machine()}")
    print(f"command: python benchmarks/{script} {arguments}".rstrip())


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print ``rows`` as a Markdown table, floats with 3 significant digits."""

    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(cell(value) for value in row) + " |")
