"""Tests of ``dst train``: argument checks, output, checkpoints and resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from test_trainer import TinyExperiment

from dst import Callback, EpochRecord, ExperimentData, Trainer, UsageError, _train_cli
from dst._train_cli import parse_options, parse_value
from dst._trainer import CHECKPOINT_NAME, check_checkpoint_settings
from dst.cli import main

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = "test_trainer:TinyExperiment"
DEMO = "test_train_cli:DemoExperiment"
UNLOADABLE = "test_train_cli:UnloadableExperiment"


class DemoExperiment(TinyExperiment):
    """The tiny experiment, reading a marker file from the ``data_dir`` its demo writes."""

    name = "tiny-demo"
    defaults = {**TinyExperiment.defaults, "data_dir": None}

    @classmethod
    def demo(cls, folder: Path) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "marker.txt").write_text("demo")
        return {"data_dir": str(folder)}

    def load(self, seed: int) -> ExperimentData:
        marker = Path(self.options["data_dir"]) / "marker.txt"
        if not marker.is_file():
            raise UsageError(f"{marker} not found")
        return super().load(seed)


class UnloadableExperiment(TinyExperiment):
    """An experiment whose data must never be loaded by a command that fails its checks."""

    def load(self, seed: int) -> ExperimentData:
        raise AssertionError("the data were loaded before the arguments were checked")


def run_dst(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dst`` in a subprocess that can import the tests' experiments."""
    paths = [str(REPOSITORY), str(REPOSITORY / "tests"), os.environ.get("PYTHONPATH", "")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    return subprocess.run(
        [sys.executable, "-m", "dst", *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--experiment", "nonexistent"], "unknown experiment 'nonexistent'"),
        (["--experiment", TINY, "--lambdas", "0.2,0.2"], "expected 5 lambdas"),
        (["--experiment", TINY, "--data-dir", "missing-folder"], "'missing-folder' not found"),
    ],
)
def test_bad_argument_exits_2_with_one_line(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    completed = run_dst("train", *arguments, cwd=tmp_path)

    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("dst train: error: ")
    assert message in lines[0]
    assert completed.stdout == ""


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--lambdas", "0.5,0.5,0.5,0,0"], "lambdas must sum to 1"),
        (["--lambdas", "a,b,c,d,e"], "invalid lambdas 'a,b,c,d,e'"),
        (["--beta", "1.5"], "invalid --beta 1.5"),
        (["--p", "-0.1"], "invalid --p -0.1"),
        (["--p", "0"], "invalid --p 0.0; expected a probability in (0, 1]"),
        (["--n-epochs", "0"], "invalid --n-epochs 0"),
        (["--lr", "0"], "invalid --lr 0.0"),
        (["--batch-size", "0"], "invalid --batch-size 0"),
        (["--num-workers", "-1"], "invalid --num-workers -1"),
        (["--scheduler", "stl"], "--scheduler stl needs --stl-task"),
        (["--device", "nonsense"], "invalid device 'nonsense'"),
        (["--option", "n_samples"], "invalid --option 'n_samples'"),
        (["--option", "unknown=1"], "unknown option 'unknown'"),
        (["--demo", "--data-dir", "."], "drop --data-dir or --demo"),
        (["--resume"], "no checkpoint to resume"),
    ],
)
def test_bad_argument_fails_before_loading_data(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
) -> None:
    output_dir = ["--output-dir", str(tmp_path / "run")]

    status = main(["train", "--experiment", UNLOADABLE, *output_dir, *arguments])

    captured = capsys.readouterr()
    assert status == 2
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_argparse_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", "--experiment", TINY, "--n-epochs", "three"])

    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "invalid int value: 'three'" in lines[0]


def test_train_prints_gates_and_task_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output_dir = tmp_path / "run"
    arguments = ["--experiment", TINY, "--scheduler", "random", "--p", "0.5"]
    arguments += ["--n-epochs", "3", "--output-dir", str(output_dir)]

    status = main(["train", *arguments])

    stdout = capsys.readouterr().out
    assert status == 0
    assert "Gates applied in each epoch" in stdout
    assert "fraction of epochs on" in stdout
    assert "reg" in stdout
    assert "cls" in stdout
    assert (output_dir / CHECKPOINT_NAME).is_file()
    epochs = pd.read_csv(output_dir / "epochs.csv")
    assert epochs["epoch"].tolist() == [1, 2, 3]
    assert {"gate/reg", "train_loss/cls", "val_avg_error"} <= set(epochs.columns)


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    arguments = ["train", "--experiment", TINY, "--output-dir", str(output_dir)]
    assert main([*arguments, "--n-epochs", "2"]) == 0
    first_epochs = pd.read_csv(output_dir / "epochs.csv")

    assert main([*arguments, "--n-epochs", "3", "--resume"]) == 0

    epochs = pd.read_csv(output_dir / "epochs.csv")
    assert epochs["epoch"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(
        epochs.iloc[:2].drop(columns="epoch_seconds"), first_epochs.drop(columns="epoch_seconds")
    )
    state = torch.load(output_dir / CHECKPOINT_NAME, weights_only=True)
    assert len(state["records"]) == 3


def test_demo_trains_on_generated_data(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"

    status = main(
        [
            "train",
            "--experiment",
            DEMO,
            "--demo",
            "--n-epochs",
            "2",
            "--output-dir",
            str(output_dir),
        ]
    )

    assert status == 0
    assert (output_dir / "demo-data" / "marker.txt").is_file()


def test_data_dir_reaches_experiment(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    DemoExperiment.demo(data_dir)

    status = main(
        [
            "train",
            "--experiment",
            DEMO,
            "--data-dir",
            str(data_dir),
            "--n-epochs",
            "2",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )

    assert status == 0


def test_default_output_dir_is_under_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert main(["train", "--experiment", TINY, "--n-epochs", "2", "--seed", "3"]) == 0

    assert (tmp_path / "runs" / "test_trainer_TinyExperiment-dst-3" / CHECKPOINT_NAME).is_file()


def test_option_values_are_typed() -> None:
    options = parse_options(["n=3", "rate=0.5", "flag=True", "off=false", "name=omni glot"])

    assert options == {"n": 3, "rate": 0.5, "flag": True, "off": False, "name": "omni glot"}
    assert isinstance(options["n"], int)


def test_option_value_keeps_text() -> None:
    assert parse_value("1e-3") == 0.001
    assert parse_value("abc") == "abc"
    assert parse_value("") == ""


def test_shapes_trains_end_to_end(tmp_path: Path) -> None:
    completed = run_dst(
        "train", "--experiment", "shapes", "--n-epochs", "2",
        "--option", "n_samples=120", "--option", "image_size=16", "--option", "width=4",
        "--output-dir", str(tmp_path / "run"),
        cwd=tmp_path,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    assert "epoch 2/2: train losses" in completed.stderr
    assert "Best epoch" in completed.stdout
    epochs = pd.read_csv(tmp_path / "run" / "epochs.csv")
    assert epochs["epoch"].tolist() == [1, 2]
    assert epochs["updated"].tolist() == [0, 1]
    assert epochs["epoch"].dtype.kind == "i"
    assert epochs["gate/pose"].dtype.kind == "i"


def test_resume_with_changed_option_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = str(tmp_path / "run")
    base = ["train", "--experiment", TINY, "--n-epochs", "2", "--output-dir", run_dir]
    assert main([*base, "--option", "n_samples=96"]) == 0
    capsys.readouterr()

    status = main([*base, "--n-epochs", "3", "--resume", "--option", "n_samples=64"])

    assert status == 2
    assert "option n_samples = 96, not 64" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (["--lambdas", "1,0,0,0,0"], "lambdas = (0.2, 0.2, 0.2, 0.2, 0.2), not (1.0, 0.0,"),
        (["--beta", "0.5"], "beta = 0.1, not 0.5"),
        (["--count-metric", "inverse"], "count_metric = 'proportional', not 'inverse'"),
        (["--scheduler", "mtl"], "scheduler = 'dst', not 'mtl'"),
    ],
)
def test_resume_with_changed_scheduler_exits_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changed: list[str], expected: str
) -> None:
    common = ["train", "--n-epochs", "2", "--output-dir", str(tmp_path / "run")]
    assert main([*common, "--experiment", TINY]) == 0
    capsys.readouterr()

    # The unloadable experiment fails the test if its data are loaded.
    status = main([*common, "--experiment", UNLOADABLE, "--resume", *changed])

    error = capsys.readouterr().err
    assert status == 2
    assert expected in error
    assert error.count("; resume with") == 1


def test_resume_names_default_option_value() -> None:
    state = {"format": 1, "seed": 0, "run_settings": {"option image_size": "None"}}

    with pytest.raises(UsageError, match="option image_size = the default, not 20;"):
        check_checkpoint_settings(state, 0, {"option image_size": "20"})


def test_interrupted_train_names_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class StopAfterEpoch2(Callback):
        def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
            if record.epoch == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(
        _train_cli, "build_callbacks", lambda args, experiment: [StopAfterEpoch2()]
    )
    run_dir = tmp_path / "run"

    status = main(["train", "--experiment", TINY, "--n-epochs", "4", "--output-dir", str(run_dir)])

    assert status == 130
    assert "run the same command with --resume" in caplog.text
    state = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    assert len(state["records"]) == 2


def test_unknown_option_logs_nothing_before_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = str(tmp_path / "run")
    base = ["train", "--experiment", TINY, "--n-epochs", "2", "--output-dir", run_dir]
    assert main(base) == 0
    caplog.clear()

    assert main([*base, "--option", "bogus=1"]) == 2
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


def test_output_dir_that_is_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "taken.txt"
    existing.write_text("not a folder")

    status = main(
        ["train", "--experiment", TINY, "--n-epochs", "2", "--output-dir", str(existing)]
    )

    assert status == 2
    assert "is a file" in capsys.readouterr().err
    assert existing.read_text() == "not a folder"


@pytest.mark.parametrize(
    "statement",
    [
        "from dst import DSTScheduler, MTLScheduler, parse_lambdas",
        "from dst.cli import build_parser; build_parser()",
    ],
)
def test_import_without_torch(statement: str) -> None:
    code = f"import sys; {statement}; print('torch' in sys.modules)"
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, timeout=60
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


def test_package_exports_every_public_name() -> None:
    import dst

    for name in dst.__all__:
        assert getattr(dst, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        _ = dst.missing
