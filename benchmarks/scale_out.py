"""Benchmark scale-out: trials per minute with 1, 2, 4 and 8 ``dst worker`` processes.

For each worker count the script creates a fresh PostgreSQL database for the Optuna storage,
creates a study as ``dst study create`` does and starts that many ``dst worker`` processes on
this machine, all logging to one MLflow server. The study has ``workers x
--trials-per-worker`` short trials: the ``shapes`` experiment at a small size, a few epochs
each, with DST lambdas sampled by TPE. Meanwhile a thread polls ``pg_stat_activity`` for the
connections to the Optuna database and to the MLflow server's database, and keeps the peak.

Throughput is the number of complete trials divided by the span from the first trial's start
to the last trial's end, taken from Optuna's trial timestamps, so the workers' start-up
(importing torch and MLflow) is left out. The throughput including start-up and the study's
end (the report and the Optuna plots that the last worker logs) is printed too. Each
worker process uses ``--threads-per-worker`` torch threads, so more workers than cores
compete for the cores.

    python benchmarks/scale_out.py
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import _services
import optuna
from sqlalchemy.engine import make_url

from dst._study import create_study
from dst._study_file import Overrides, load_study_file
from dst._study_storage import MAX_OVERFLOW, POOL_SIZE

CONNECTIONS_PER_WORKER = POOL_SIZE + MAX_OVERFLOW + 1
"""Upper bound of one worker's storage connections: its pool, its overflow and the lock."""

STUDY_FILE = """\
[study]
name = "{name}"
n_trials = {n_trials}
n_epochs = {n_epochs}
seeds = [0]

[experiment]
name = "shapes"

[experiment.options]
n_samples = {n_samples}
image_size = 16
width = 4

[scheduler]
name = "dst"

[search]
lambdas = true
beta = [0.0, 0.5]

[sampler]
name = "tpe"
seed = 0
"""


@dataclass
class ScaleResult:
    """Throughput and peak PostgreSQL connections of one worker count."""

    n_workers: int
    n_complete: int
    n_trials: int
    trial_seconds: list[float]
    trial_span: float
    """Seconds from the first trial's start to the last trial's end."""
    wall_seconds: float
    """Seconds from starting the workers to the exit of the last one."""
    peak_storage_connections: int
    peak_tracking_connections: int | None

    @property
    def trials_per_minute(self) -> float:
        return 60.0 * self.n_complete / self.trial_span if self.trial_span > 0 else 0.0

    @property
    def wall_trials_per_minute(self) -> float:
        return 60.0 * self.n_complete / self.wall_seconds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure trials per minute with several dst worker processes on one"
        " PostgreSQL storage, and the peak number of PostgreSQL connections."
    )
    parser.add_argument(
        "--workers",
        help="comma-separated worker counts (default: 1,2,4,8, or 1,2 with --quick)",
    )
    parser.add_argument(
        "--trials-per-worker",
        type=int,
        default=4,
        help="trials of the study per worker (default: 4)",
    )
    parser.add_argument(
        "--n-epochs",
        type=int,
        default=3,
        help="epochs of each trial, epoch 1 included (default: 3)",
    )
    parser.add_argument(
        "--n-samples",
        type=int,
        default=300,
        help="generated shapes of each trial, 70 %% of them for training (default: 300)",
    )
    parser.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        help="torch threads of each worker process (default: 1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds each worker count may take before its workers are stopped (default: 1800)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 short trial per worker, to check the script",
    )
    _services.add_service_arguments(parser)

    args = parser.parse_args(argv)
    workers = args.workers or ("1,2" if args.quick else "1,2,4,8")
    args.worker_counts = _services.parse_int_list(workers, "--workers")
    for option in ("trials_per_worker", "n_epochs", "n_samples", "threads_per_worker"):
        _services.check_positive(getattr(args, option), "--" + option.replace("_", "-"))
    if args.quick:
        args.trials_per_worker = 1
        args.n_epochs = 2
        args.n_samples = 60
    return args


def main(argv: Sequence[str] | None = None) -> list[ScaleResult]:
    """Run the study once per worker count and print the throughput table."""
    args = parse_args(argv)
    _services.print_header("scale-out", Path(__file__).name, argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="dst-scale-out-") as folder:
        with _services.mlflow_tracking(args) as tracking:
            for n_workers in args.worker_counts:
                result = run_workers(n_workers, tracking, args, Path(folder))
                print(
                    f"{n_workers} workers: {result.n_complete}/{result.n_trials} trials complete"
                    f" in {result.trial_span:.1f} s"
                )
                results.append(result)
    print_results(results, args)
    return results


def run_workers(
    n_workers: int, tracking: _services.Tracking, args: argparse.Namespace, folder: Path
) -> ScaleResult:
    """Create a study of ``n_workers * --trials-per-worker`` trials and let the workers run it."""
    name = f"benchmark-scale-out-{n_workers}-{uuid.uuid4().hex[:8]}"
    n_trials = n_workers * args.trials_per_worker
    study_file = folder / f"{name}.toml"
    study_file.write_text(
        STUDY_FILE.format(
            name=name, n_trials=n_trials, n_epochs=args.n_epochs, n_samples=args.n_samples
        )
    )
    with _services.temporary_database(args.postgres, "dst_benchmark_optuna") as storage_url:
        _create_study(study_file, storage_url, tracking.url)
        databases = [make_url(storage_url).database or ""]
        if tracking.database is not None:
            databases.append(tracking.database)
        with _services.ConnectionWatcher(args.postgres, databases) as watcher:
            started = time.perf_counter()
            arguments = ["worker", "--study", name, "--storage", storage_url]
            _run_workers(n_workers, arguments, args, folder / name)
            wall_seconds = time.perf_counter() - started
        study = optuna.load_study(study_name=name, storage=storage_url)
        trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        _dispose(study)
    starts = [trial.datetime_start for trial in trials if trial.datetime_start]
    ends = [trial.datetime_complete for trial in trials if trial.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if trials else 0.0
    return ScaleResult(
        n_workers=n_workers,
        n_complete=len(trials),
        n_trials=n_trials,
        trial_seconds=[trial.duration.total_seconds() for trial in trials if trial.duration],
        trial_span=span,
        wall_seconds=wall_seconds,
        peak_storage_connections=watcher.peaks[databases[0]],
        peak_tracking_connections=watcher.peaks.get(tracking.database or ""),
    )


def _dispose(study: optuna.Study) -> None:
    """Close the benchmark's own storage connections, so that the database can be dropped."""
    engine = getattr(study._storage, "engine", None)  # noqa: SLF001
    if engine is not None:
        engine.dispose()


def _create_study(study_file: Path, storage_url: str, tracking_uri: str) -> None:
    """Create the study as ``dst study create`` does, then close this process's connections."""
    config = load_study_file(study_file, Overrides())
    created = create_study(config, storage_url, tracking_uri, store_tracking_uri=True)
    _dispose(created.study)


def _run_workers(
    n_workers: int, arguments: list[str], args: argparse.Namespace, log_prefix: Path
) -> None:
    """Start ``n_workers`` worker processes, each in its own process group, and wait for all."""
    command = [sys.executable, "-m", "dst", "--log-level", "INFO", *arguments]
    environment = _services.subprocess_environment(args.threads_per_worker)
    processes = []
    for index in range(n_workers):
        with open(f"{log_prefix}-worker-{index}.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + args.timeout
    try:
        for index, process in enumerate(processes):
            remaining = max(deadline - time.monotonic(), 0.0)
            status = process.wait(timeout=remaining)
            if status != 0:
                raise RuntimeError(
                    f"worker {index} exited with status {status}; see"
                    f" {log_prefix}-worker-{index}.log"
                )
    except subprocess.TimeoutExpired:
        raise TimeoutError(
            f"{n_workers} workers did not finish within --timeout {args.timeout:.0f} s; give"
            " a longer --timeout or fewer --trials-per-worker"
        ) from None
    finally:
        for process in processes:
            _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """Stop a worker's process group if it still runs: SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def print_results(results: Iterable[ScaleResult], args: argparse.Namespace) -> None:
    """Print one row per worker count, with the speed-up over the first count."""
    results = list(results)
    reference = results[0].trials_per_minute if results else 0.0
    rows = []
    for result in results:
        tracking = result.peak_tracking_connections
        bound = CONNECTIONS_PER_WORKER * result.n_workers
        rows.append(
            [
                result.n_workers,
                f"{result.n_complete}/{result.n_trials}",
                _services.median(result.trial_seconds),
                f"{result.trials_per_minute:.1f}",
                f"{result.trials_per_minute / reference:.2f}" if reference else "-",
                f"{result.wall_trials_per_minute:.1f}",
                f"{result.peak_storage_connections} (bound {bound})",
                "-" if tracking is None else tracking,
            ]
        )
    header = [
        "workers",
        "complete trials",
        "median trial (s)",
        "trials/min",
        "speed-up",
        "trials/min with start-up",
        "peak Optuna DB connections",
        "peak MLflow DB connections",
    ]
    _services.print_table(header, rows)
    print(
        f"Trials: shapes, {args.n_samples} samples of 16x16 pixels, {args.n_epochs} epochs,"
        f" {args.threads_per_worker} torch thread(s) per worker, on {os.cpu_count()} cores."
        " speed-up: trials/min over that of the first row."
    )


if __name__ == "__main__":
    _services.run_script(main)
