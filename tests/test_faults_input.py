"""Bad input: the real ``dst`` command in a subprocess for each case.

Each case must exit with status 2 and print exactly one line to stderr, with no log line
before it and no traceback. It must write nothing: no study storage file, no study in the
storage, no MLflow experiment on the tracking server and no other file in the working folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]

STUDY = "bad-input"
TINY_SHAPES = """
    [experiment]
    name = "shapes"
    [experiment.options]
    n_samples = 32
    image_size = 16
    width = 4
"""


@dataclass(frozen=True)
class Case:
    """One bad input: the arguments after ``dst`` and a text the error line must contain.

    ``{study_file}``, ``{storage}``, ``{tracking}``, ``{data}`` and ``{port}`` in the
    arguments are filled in by the test.
    """

    args: tuple[str, ...]
    expected: str
    study_body: str = ""
    files: dict[str, bytes] = field(default_factory=dict)


def study_file(body: str, experiment: str = TINY_SHAPES, n_trials: str = "1") -> str:
    header = f'[study]\nname = "{STUDY}"\nn_epochs = 2\nn_trials = {n_trials}\n'
    return header + textwrap.dedent(experiment) + textwrap.dedent(body)


CREATE = ("study", "create", "{study_file}", "--storage", "{storage}", "--tracking-uri")
CREATE_HTTP = (*CREATE, "{tracking}")
OMNIGLOT = """
    [experiment]
    name = "omniglot"
"""

CASES: dict[str, Case] = {
    "negative lambdas": Case(
        CREATE_HTTP,
        "[scheduler].lambdas",
        study_file("[scheduler]\nlambdas = [0.6, -0.1, 0.2, 0.2, 0.1]\n"),
    ),
    "lambdas not summing to 1": Case(
        CREATE_HTTP,
        "sum to 1",
        study_file("[scheduler]\nlambdas = [0.3, 0.3, 0.3, 0.3, 0.3]\n"),
    ),
    "four lambdas": Case(
        CREATE_HTTP,
        "[scheduler].lambdas",
        study_file("[scheduler]\nlambdas = [0.25, 0.25, 0.25, 0.25]\n"),
    ),
    "beta above 1": Case(CREATE_HTTP, "[scheduler].beta", study_file("[scheduler]\nbeta = 1.5\n")),
    "negative beta in a row": Case(
        CREATE_HTTP, "beta", study_file("[[enqueue]]\nlabel = 'a'\nbeta = -0.1\n")
    ),
    "train with negative lambdas": Case(
        ("train", "--experiment", "shapes", "--lambdas", "0.6,-0.1,0.2,0.2,0.1"),
        "got -0.1",
    ),
    "train with three lambdas": Case(
        ("train", "--experiment", "shapes", "--lambdas", "0.5,0.25,0.25"), "lambdas"
    ),
    "train with beta above 1": Case(("train", "--experiment", "shapes", "--beta", "2"), "beta"),
    "unknown experiment": Case(
        CREATE_HTTP,
        "no-such-experiment",
        study_file("", '[experiment]\nname = "no-such-experiment"\n'),
    ),
    "train with unknown experiment": Case(
        ("train", "--experiment", "no-such-experiment"), "no-such-experiment"
    ),
    "missing data folder": Case(
        (*CREATE_HTTP, "--data-dir", "{data}/missing"),
        "does not exist",
        study_file("", OMNIGLOT),
    ),
    "empty data folder": Case(
        (*CREATE_HTTP, "--data-dir", "{data}/empty"),
        "empty",
        study_file("", OMNIGLOT),
        {"empty/": b""},
    ),
    "data folder in the wrong layout": Case(
        (*CREATE_HTTP, "--data-dir", "{data}/flat"),
        "no Omniglot images found",
        study_file("", OMNIGLOT),
        {"flat/character01.png": b"not an image"},
    ),
    "data zip in the wrong layout": Case(
        (*CREATE_HTTP, "--data-dir", "{data}/flat.zip"),
        "no Omniglot images found",
        study_file("", OMNIGLOT),
        {"flat.zip": b"zip"},
    ),
    "unknown key in the study file": Case(
        CREATE_HTTP, "n_epoch", study_file("[train]\nn_epoch = 3\n")
    ),
    "unknown table in the study file": Case(
        CREATE_HTTP, "optimizer", study_file("[optimizer]\nname = 'sgd'\n")
    ),
    "wrong type in the study file": Case(
        CREATE_HTTP, "n_trials", study_file("", n_trials='"two"')
    ),
    "study file that is not TOML": Case(CREATE_HTTP, "TOML", "[study\nname = 1\n"),
    "missing study file": Case(
        ("study", "create", "{data}/missing.toml", "--storage", "{storage}"),
        "missing.toml' not found; check the path",
    ),
    "storage that does not connect": Case(
        (
            *CREATE[:4],
            "postgresql+psycopg://postgres@127.0.0.1:{port}/optuna",
            "--tracking-uri",
            "{tracking}",
        ),
        "127.0.0.1:{port}",
        study_file("[[enqueue]]\nlabel = 'a'\n"),
    ),
    "worker with storage that does not connect": Case(
        ("worker", "--study", STUDY, "--storage", "postgresql://postgres@127.0.0.1:{port}/x"),
        "127.0.0.1:{port}",
    ),
    "tracking server that does not respond": Case(
        (*CREATE, "http://127.0.0.1:{port}"),
        "http://127.0.0.1:{port} does not respond",
        study_file("[[enqueue]]\nlabel = 'a'\n"),
    ),
    "report from a tracking server that does not respond": Case(
        ("report", "--study", STUDY, "--tracking-uri", "http://127.0.0.1:{port}"),
        "does not respond",
    ),
    "worker with a storage database that does not exist": Case(
        (
            "worker",
            "--study",
            STUDY,
            "--storage",
            "postgresql+psycopg://postgres@127.0.0.1:5432/dst_no_such_database",
        ),
        "create it with 'createdb -h 127.0.0.1 -p 5432 -U postgres dst_no_such_database'",
    ),
    "study that does not exist": Case(
        ("worker", "--study", "no-such-study", "--storage", "{postgres}"),
        "study 'no-such-study' not found",
    ),
    "worker with a storage file that does not exist": Case(
        ("worker", "--study", STUDY, "--storage", "{storage}"), "does not exist"
    ),
    "tracking URI with an unknown scheme": Case(
        (*CREATE, "foo://bar"),
        "invalid MLflow tracking URI 'foo://bar'",
        study_file("[[enqueue]]\nlabel = 'a'\n"),
    ),
    "report from a SQLite store that does not exist": Case(
        ("report", "--study", STUDY, "--tracking-uri", "sqlite:///mlflow.db"),
        "MLflow store 'sqlite:///mlflow.db' not found",
    ),
}


def dst_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DST_STORAGE", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = folder / name
        if name.endswith("/"):
            path.mkdir(parents=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".zip"):
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr("images/a.png", content)
            continue
        path.write_bytes(content)


def list_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture(scope="module")
def postgres_storage() -> Iterator[str]:
    """Return a PostgreSQL storage with Optuna's tables and one unrelated study."""
    from conftest import create_database, drop_database

    url = create_database("dst_faults_input")
    optuna.create_study(storage=url, study_name="other-study")
    yield url
    drop_database(url)


@dataclass(frozen=True)
class Outcome:
    """A finished case: the process result and the folders it ran with."""

    result: subprocess.CompletedProcess[str]
    work: Path
    data: Path
    data_before: list[str]
    values: dict[str, str]


def run_case(case: Case, folder: Path, tracking: str, postgres: str) -> Outcome:
    work = folder / "work"
    data = folder / "data"
    work.mkdir(parents=True)
    data.mkdir()
    write_files(data, case.files)
    if case.study_body:
        (data / "study.toml").write_text(case.study_body)
    values = {
        "study_file": str(data / "study.toml"),
        "storage": f"sqlite:///{work / 'optuna.db'}",
        "tracking": tracking,
        "data": str(data),
        "port": str(free_port()),
        "postgres": postgres,
    }
    args = [arg.format(**values) for arg in case.args]
    data_before = list_files(data)
    result = subprocess.run(
        [sys.executable, "-m", "dst", *args],
        cwd=work,
        env=dst_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    return Outcome(result, work, data, data_before, values)


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server, postgres_storage
) -> dict[str, Outcome]:
    """Run every case once, two processes at a time, since each spends seconds on imports."""
    root = tmp_path_factory.mktemp("bad-input")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(
                run_case, case, root / f"case-{index}", mlflow_server.url, postgres_storage
            )
            for index, (name, case) in enumerate(CASES.items())
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(name, outcomes, mlflow_server, postgres_storage):
    outcome = outcomes[name]
    result = outcome.result
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("dst "), result.stderr
    assert CASES[name].expected.format(**outcome.values) in lines[0]
    assert result.stdout == ""
    assert list_files(outcome.work) == []
    assert list_files(outcome.data) == outcome.data_before
    assert optuna.get_all_study_names(postgres_storage) == ["other-study"]
    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert client.get_experiment_by_name(STUDY) is None
