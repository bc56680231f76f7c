"""Smoke tests of the benchmark scripts at their ``--quick`` size, so that they keep working.

Each script runs in this process against the session's real ``mlflow server`` and the real
PostgreSQL server. The checks are on what the scripts measure, not on how fast this machine
is: the ratios are finite and positive, every epoch sends one HTTP request, every trial
completes and the workers stay within their connection bound.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import MlflowServer

from dst import UsageError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow

ScriptLoader = Callable[[str], ModuleType]


@pytest.fixture
def load_script(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptLoader]:
    """Return a loader of benchmark scripts by module name, with ``benchmarks/`` on the path."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    n_threads = torch.get_num_threads()

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    yield load
    # The scripts' --threads sets torch's threads for the whole process.
    torch.set_num_threads(n_threads)


def _is_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_trainer_overhead_ratio_is_measured(
    load_script: ScriptLoader, mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("trainer_overhead")

    results = script.main(["--quick", "--threads", "1", "--tracking-uri", mlflow_server.url])

    assert set(results) == {"shapes", "omniglot"}
    for result in results.values():
        assert len(result.trainer) == 1
        assert len(result.baseline) == 1
        assert _is_positive(result.wall_ratio)
        assert _is_positive(result.cpu_ratio)
    output = capsys.readouterr().out
    assert "| shapes | 1 |" in output
    assert "| omniglot | 1 |" in output


def test_dst_saving_ratios_and_tasks_on(
    load_script: ScriptLoader, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("dst_saving")

    results = script.main(["--quick", "--threads", "1"])

    assert set(results) == {"face", "shapes"}
    for result in results.values():
        assert len(result.times["dst"].epoch) == 2
        assert len(result.times["mtl"].epoch) == 2
        assert _is_positive(result.ratio("train_pass", "wall"))
        assert _is_positive(result.ratio("epoch", "cpu"))
        assert 0.0 <= result.mean_fraction_on <= 1.0
    # MTL keeps every gate on, so its timed epochs have every task on.
    for active in results["shapes"].times["mtl"].active:
        assert active.all()
    assert "| face | 2 |" in capsys.readouterr().out


def test_tracking_sends_one_request_per_epoch(
    load_script: ScriptLoader, mlflow_server: MlflowServer
) -> None:
    script = load_script("tracking_cost")

    result = script.main(["--quick", "--threads", "1", "--tracking-uri", mlflow_server.url])

    assert result.requests_per_epoch == [1, 1]
    assert all(_is_positive(fraction) for fraction in result.fractions)
    # 4 run values and 11 per task of the 5 shapes tasks, with the DST probability terms.
    assert result.n_metrics == 4 + 11 * 5
    assert result.end.requests == 3
    assert sorted(result.latencies) == [1, result.n_metrics]
    assert all(len(seconds) == 2 for seconds in result.latencies.values())


def test_scale_out_completes_every_trial(
    load_script: ScriptLoader, mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("scale_out")

    results = script.main(["--quick", "--workers", "2", "--tracking-uri", mlflow_server.url])

    [result] = results
    assert result.n_workers == 2
    assert result.n_complete == result.n_trials == 2
    assert _is_positive(result.trials_per_minute)
    assert 1 <= result.peak_storage_connections <= 2 * script.CONNECTIONS_PER_WORKER
    assert "trials/min" in capsys.readouterr().out


def test_scale_out_rejects_zero_workers(load_script: ScriptLoader) -> None:
    script = load_script("scale_out")

    with pytest.raises(UsageError, match="--workers"):
        script.main(["--workers", "2,0"])


def test_report_time_reads_every_trial(
    load_script: ScriptLoader, mlflow_server: MlflowServer
) -> None:
    script = load_script("report_time")

    result = script.main(["--quick", "--tracking-uri", mlflow_server.url])

    assert result.n_runs == 20
    assert result.n_rows == 20
    assert _is_positive(result.command_seconds[0])
    assert _is_positive(result.in_process_seconds[0])
