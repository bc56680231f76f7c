"""Fixtures that start the real services the tests talk to.

``postgres_database`` creates a fresh database on the PostgreSQL server at
``DST_TEST_POSTGRES`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432``) and drops it
afterwards. ``mlflow_server`` starts a real ``mlflow server`` process on a free 127.0.0.1 port,
backed by its own Postgres database, in its own process group. Both fail the test, never skip
it, when the service is missing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy

POSTGRES_SERVER = os.environ.get(
    "DST_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432"
)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OMNIGLOT_ZIP = SHARED_DATA / "omniglot" / "images_background_small1.zip"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no process listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _admin_engine() -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(f"{POSTGRES_SERVER}/postgres", isolation_level="AUTOCOMMIT")


def create_database(prefix: str = "dst_test") -> str:
    """Create an empty Postgres database and return its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine()
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{POSTGRES_SERVER}/{name}"


def drop_database(url: str) -> None:
    """Drop the database at ``url``, ending the connections that remain to it."""
    name = url.rsplit("/", 1)[1]
    engine = _admin_engine()
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def postgres_database() -> Iterator[Callable[[], str]]:
    """Return a factory of fresh Postgres databases, all dropped after the test."""
    created: list[str] = []

    def factory() -> str:
        url = create_database()
        created.append(url)
        return url

    yield factory
    for url in created:
        drop_database(url)


@dataclass
class MlflowServer:
    """A running ``mlflow server`` process group on 127.0.0.1."""

    backend_uri: str
    artifacts_dir: Path
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        """Start the server and wait until ``/health`` returns 200."""
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        self.log_path = self.artifacts_dir.parent / f"mlflow-server-{self.port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child process owns it
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; log: {self.log_path.read_text()}")
            if self.is_healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not respond in {timeout} s; log: {self.log_path}")

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        """Stop the whole process group: the server and the workers it started."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        # Children can outlive a group leader that exits first, so end them too.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def start_mlflow_server(
    tmp_path: Path, postgres_database: Callable[[], str]
) -> Iterator[Callable[[], MlflowServer]]:
    """Return a factory of ``mlflow server`` processes that this test alone uses.

    For tests that stop, kill or restart the server. Each server gets a fresh database and
    is stopped after the test.
    """
    servers: list[MlflowServer] = []

    def factory() -> MlflowServer:
        artifacts = tmp_path / f"mlartifacts-{len(servers)}"
        artifacts.mkdir()
        server = MlflowServer(backend_uri=postgres_database(), artifacts_dir=artifacts)
        servers.append(server)
        server.start()
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running ``mlflow server`` on a fresh Postgres database, shared by the session.

    Tests that share it must use their own MLflow experiment (a unique study name).
    """
    backend_uri = create_database("dst_test_mlflow")
    server = MlflowServer(
        backend_uri=backend_uri, artifacts_dir=tmp_path_factory.mktemp("mlartifacts")
    )
    server.start()
    yield server
    server.stop()
    drop_database(backend_uri)


@pytest.fixture
def omniglot_zip() -> Path:
    """The real Omniglot subset shipped beside the checkout (fails when it is missing)."""
    assert OMNIGLOT_ZIP.is_file(), f"Omniglot data not found at {OMNIGLOT_ZIP}"
    return OMNIGLOT_ZIP
