"""Benchmark ``dst report`` on a study of 1,000 finished runs.

The script logs a synthetic study to an MLflow server as ``dst worker`` would log it, without
training: ``--n-trials`` sampled DST trials with random lambdas and random test errors, each
a FINISHED trial run (with ``--n-seeds`` above 1, a trial run and one seed run per seed),
optionally with per-epoch metrics. Logging is set-up and is not timed. Then it times the
command a user types, ``dst report --study NAME --tracking-uri URL``, as a new process
(interpreter start-up and imports included), and ``build_report`` plus ``render_report`` in
this process, each ``--repeats`` times, and prints the medians.

    python benchmarks/report_time.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import _services

from dst._errors import UsageError
from dst._report import _log_synthetic_study, _random_synthetic_trials, build_report, render_report

TASK_NAMES = ("gender", "spectacles", "landmarks", "pose", "denoising")


@dataclass
class ReportResult:
    """Timings of the report of one synthetic study, in seconds."""

    n_runs: int
    n_rows: int
    logging_seconds: float
    command_seconds: list[float]
    in_process_seconds: list[float]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time 'dst report' on a synthetic study of finished MLflow runs."
    )
    parser.add_argument(
        "--n-trials", type=int, default=1000, help="sampled trials of the study (default: 1000)"
    )
    parser.add_argument(
        "--n-seeds",
        type=int,
        default=1,
        help="seeds per trial; above 1 each trial has a run per seed too (default: 1)",
    )
    parser.add_argument(
        "--n-epochs",
        type=int,
        default=0,
        help="epochs of per-epoch metrics logged to every run (default: 0, none)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed reports of each kind (default: 3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=8,
        help="threads that log the synthetic study at once (default: 8)",
    )
    parser.add_argument("--quick", action="store_true", help="20 trials and 1 report of each kind")
    _services.add_service_arguments(parser)

    args = parser.parse_args(argv)
    for option in ("n_trials", "n_seeds", "repeats", "threads"):
        _services.check_positive(getattr(args, option), "--" + option.replace("_", "-"))
    if args.n_epochs < 0:
        raise UsageError(f"--n-epochs must be 0 or more, got {args.n_epochs}")
    if args.quick:
        args.n_trials = min(args.n_trials, 20)
        args.repeats = 1
    return args


def main(argv: Sequence[str] | None = None) -> ReportResult:
    """Log the synthetic study, time its report and print the medians."""
    args = parse_args(argv)
    _services.print_header("dst report", Path(__file__).name, argv)
    with _services.mlflow_tracking(args) as tracking:
        result = measure(tracking.url, args)
    print_result(result, args)
    return result


def measure(tracking_uri: str, args: argparse.Namespace) -> ReportResult:
    """Log the study, then time the report command and the in-process report."""
    study_name = f"benchmark-report-{uuid.uuid4().hex[:8]}"
    trials = _random_synthetic_trials(args.n_trials, args.n_seeds, len(TASK_NAMES))
    n_runs = args.n_trials * (1 if args.n_seeds == 1 else 1 + args.n_seeds)
    print(f"logging {n_runs} finished runs of study {study_name} ...", flush=True)
    started = time.perf_counter()
    _log_synthetic_study(
        tracking_uri,
        study_name,
        trials,
        TASK_NAMES,
        n_epochs=args.n_epochs,
        n_threads=args.threads,
    )
    logging_seconds = time.perf_counter() - started
    print(f"logged in {logging_seconds:.0f} s")

    command = [sys.executable, "-m", "dst", "--log-level", "WARNING", "report"]
    command += ["--study", study_name, "--tracking-uri", tracking_uri]
    command_seconds, in_process_seconds = [], []
    n_rows = 0
    # Alternate the two kinds, so that drift in the machine's load reaches both.
    for _ in range(args.repeats):
        started = time.perf_counter()
        completed = subprocess.run(
            command, capture_output=True, text=True, env=_services.subprocess_environment()
        )
        command_seconds.append(time.perf_counter() - started)
        if completed.returncode != 0:
            raise RuntimeError(f"dst report failed: {completed.stderr.strip()}")

        started = time.perf_counter()
        report = build_report(tracking_uri, study_name)
        render_report(report, "text")
        in_process_seconds.append(time.perf_counter() - started)
        n_rows = len(report)
    return ReportResult(n_runs, n_rows, logging_seconds, command_seconds, in_process_seconds)


def print_result(result: ReportResult, args: argparse.Namespace) -> None:
    """Print the median times of the report command and of the in-process report."""
    header = [
        "finished runs",
        "report rows",
        "epochs per run",
        "dst report (s)",
        "build_report + render_report (s)",
    ]
    row = [
        result.n_runs,
        result.n_rows,
        args.n_epochs,
        _services.median(result.command_seconds),
        _services.median(result.in_process_seconds),
    ]
    _services.print_table(header, [row])
    print(
        f"Medians of {len(result.command_seconds)} runs each. dst report: a new process,"
        " start-up and imports included; the other column: the same report in this process."
    )


if __name__ == "__main__":
    _services.run_script(main)
