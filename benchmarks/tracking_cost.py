"""Benchmark the cost of MLflow tracking: logging time per epoch and HTTP requests per epoch.

The script trains one experiment through ``Trainer.fit`` with the DST scheduler, which logs
the most metrics per epoch, at every lambda 0.2 and beta 0.1. The ``EpochLogger`` that
``dst worker`` uses logs the run to an MLflow server. It times the logger's hook at the end of each
epoch, the time that training waits for logging, and divides it by the epoch's wall-clock
time (training, evaluation and logging). It counts the HTTP requests that MLflow's REST
client sends during each epoch. Epoch 1 is left out, because its request opens the HTTP
connection. The target is under 1 % of the
epoch time. It also prints the requests and time of the run's start (tags) and end (summary
metrics, ``epochs.csv`` and ``figure6.png``), which happen once per run. Last, it times
``log_batch`` requests of 1 metric and of an epoch's number of metrics on a run of their
own, to tell the server's latency from the cost of the batch's size.

    python benchmarks/tracking_cost.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _services
import _training
import torch

from dst._errors import UsageError
from dst._experiment import Experiment
from dst._scheduler import make_scheduler
from dst._tracking import FINISHED, EpochLogger, epoch_metrics, log_metrics
from dst._trainer import (
    EpochRecord,
    TrainConfig,
    Trainer,
    TrainResult,
    resolve_config,
    seed_everything,
)

TARGET_FRACTION = 0.01
QUICK_OPTIONS: dict[str, Any] = {"n_samples": 120, "image_size": 16, "width": 4}
"""Options of the ``shapes`` experiment under ``--quick``."""


@dataclass
class Cost:
    """Wall-clock seconds and HTTP requests of one piece of logging."""

    seconds: float
    requests: int


class TimedEpochLogger(EpochLogger):
    """``EpochLogger`` that times each hook and counts the HTTP requests of each epoch.

    An epoch's requests are those that its send makes on the logger's sender thread, counted
    around that send, because a window between two hooks would catch a send still in flight
    at one hook or the other. The main thread sends nothing while the sender thread works.

    Args:
        counter: Counter of the requests of this process, see ``count_http_requests``.
        *args: The arguments of ``EpochLogger``.
    """

    def __init__(self, counter: _services.RequestCounter, *args: Any) -> None:
        super().__init__(*args)
        self.counter = counter
        self.start: Cost | None = None
        self.epochs: dict[int, Cost] = {}
        self.n_epoch_metrics = 0
        self.end: Cost | None = None
        self.epoch_requests: dict[int, int] = {}
        """HTTP requests of each epoch's send, by epoch."""
        self._last_count = counter.count

    def on_train_start(self, trainer: Trainer) -> None:
        self.start = self._measure(super().on_train_start, trainer)

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        self.epochs[record.epoch] = self._measure(super().on_epoch_end, trainer, record)
        self.n_epoch_metrics = len(epoch_metrics(record, self.keys))

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        # The last epoch's send belongs to that epoch, so it ends before the end is measured.
        self.wait_for_pending()
        self._last_count = self.counter.count
        self.end = self._measure(super().on_train_end, trainer, result)

    def _send(self, values: Mapping[str, float], step: int) -> None:
        before = self.counter.count
        super()._send(values, step)
        self.epoch_requests[step] = self.counter.count - before

    def _measure(self, hook: Any, *args: Any) -> Cost:
        started = time.perf_counter()
        hook(*args)
        seconds = time.perf_counter() - started
        n_requests = self.counter.count - self._last_count
        self._last_count = self.counter.count
        return Cost(seconds, n_requests)


@dataclass
class TrackingResult:
    """Per-epoch logging cost and epoch times of one run, with its once-per-run costs."""

    experiment: str
    data: str
    n_metrics: int
    """Metrics in each epoch's request."""
    run_creation: Cost
    start: Cost
    end: Cost
    logging: list[Cost]
    epoch_seconds: list[float]
    latencies: dict[int, list[float]]
    """Seconds of each probe ``log_batch`` request, by the number of metrics it carried."""

    @property
    def fractions(self) -> list[float]:
        """Logging time over epoch wall-clock time, per timed epoch."""
        pairs = zip(self.logging, self.epoch_seconds, strict=True)
        return [cost.seconds / seconds for cost, seconds in pairs]

    @property
    def requests_per_epoch(self) -> list[int]:
        return [cost.requests for cost in self.logging]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the MLflow logging time per epoch as a fraction of the epoch"
        " time, and the HTTP requests per epoch."
    )
    parser.add_argument(
        "--experiment", default="shapes", help="experiment to train (default: shapes)"
    )
    parser.add_argument(
        "--data-dir", help="data folder of an experiment that reads one (default: demo data)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="EXPERIMENT.KEY=VALUE",
        help="experiment option (repeatable), such as shapes.n_samples=500",
    )
    parser.add_argument(
        "--n-epochs", type=int, default=6, help="epochs, counting epoch 1 (default: 6)"
    )
    parser.add_argument(
        "--probe-requests",
        type=int,
        default=10,
        help="log_batch requests of each size timed after training, on a run of their own"
        " (default: 10)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's default for this machine)"
    )
    parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny data and 3 epochs, to check the script"
    )
    _services.add_service_arguments(parser)

    args = parser.parse_args(argv)
    if _services.check_positive(args.n_epochs, "--n-epochs") < 2:
        raise UsageError(
            f"--n-epochs must be at least 2, got {args.n_epochs}; epoch 1 is not timed"
        )
    _services.check_positive(args.probe_requests, "--probe-requests")
    if args.quick:
        args.n_epochs = 3
        args.probe_requests = 2
    return args


def main(argv: Sequence[str] | None = None) -> TrackingResult:
    """Train one tracked run, print the logging cost per epoch and per run."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(_services.check_positive(args.threads, "--threads"))
    options = _training.parse_experiment_options(args.option).get(args.experiment, {})
    if args.quick and args.experiment == "shapes":
        options = {**QUICK_OPTIONS, **options}
    _services.print_header("MLflow tracking cost", Path(__file__).name, argv)
    with tempfile.TemporaryDirectory(prefix="dst-tracking-") as folder:
        experiment = _training.make_experiment(
            args.experiment, options, args.data_dir, Path(folder)
        )
        with _services.mlflow_tracking(args) as tracking:
            result = measure(experiment, tracking.url, args)
    print_result(result)
    return result


def measure(experiment: Experiment, tracking_uri: str, args: argparse.Namespace) -> TrackingResult:
    """Train one DST run with a timed, counted ``EpochLogger``."""
    config = resolve_config(
        TrainConfig(n_epochs=args.n_epochs, seed=0, device=args.device), experiment
    )
    seed_everything(config.seed)
    data = experiment.load(config.seed)
    model = experiment.build_model(data.tasks)
    data_text = _training.describe_data(data, int(config.batch_size or 0))
    print(f"{experiment.name}: {data_text}")
    scheduler = make_scheduler(
        "dst", data.tasks, lambdas=_training.PAPER_LAMBDAS, beta=_training.PAPER_BETA
    )

    study_name = f"benchmark-tracking-{uuid.uuid4().hex[:8]}"
    with _services.count_http_requests() as counter:
        run_creation, run = _create_run(counter, tracking_uri, study_name, experiment, config)
        logger = TimedEpochLogger(counter, run.client, run.run_id, run.tree)
        clock = _training.EpochClock()
        Trainer(data, model, scheduler, config, [logger, clock]).fit()
        run.finish()
    latencies = probe_latency(run, [1, logger.n_epoch_metrics], args.probe_requests)

    assert logger.start is not None and logger.end is not None
    timed = range(2, config.n_epochs + 1)
    return TrackingResult(
        experiment=experiment.name,
        data=data_text,
        n_metrics=logger.n_epoch_metrics,
        run_creation=run_creation,
        start=logger.start,
        end=logger.end,
        logging=[
            Cost(logger.epochs[epoch].seconds, logger.epoch_requests[epoch]) for epoch in timed
        ],
        epoch_seconds=[clock.seconds[epoch].wall for epoch in timed],
        latencies=latencies,
    )


def probe_latency(
    run: _training.TrackedRun, sizes: Sequence[int], n_requests: int
) -> dict[int, list[float]]:
    """Time ``n_requests`` ``log_batch`` requests of each size on a new run of the experiment.

    The sizes alternate, so that drift in the machine's load reaches each of them. The run
    ends FINISHED.
    """
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    probe_run_id = run.client.create_run(experiment_id, run_name="latency probe").info.run_id
    latencies: dict[int, list[float]] = {size: [] for size in sizes}
    for step in range(n_requests):
        for size in sizes:
            values = {f"probe_{index}": 0.5 for index in range(size)}
            started = time.perf_counter()
            log_metrics(run.client, probe_run_id, values, step)
            latencies[size].append(time.perf_counter() - started)
    run.client.set_terminated(probe_run_id, FINISHED)
    return latencies


def _create_run(
    counter: _services.RequestCounter,
    tracking_uri: str,
    study_name: str,
    experiment: Experiment,
    config: TrainConfig,
) -> tuple[Cost, _training.TrackedRun]:
    requests_before = counter.count
    started = _services.Reading.now()
    run = _training.create_tracked_run(tracking_uri, study_name, experiment, config, "dst")
    seconds = (_services.Reading.now() - started).wall
    return Cost(seconds, counter.count - requests_before), run


def print_result(result: TrackingResult) -> None:
    """Print the per-epoch figures against the target, then the once-per-run costs."""
    fraction = _services.median(result.fractions)
    logging_ms = 1000 * _services.median([cost.seconds for cost in result.logging])

    header = [
        "experiment",
        "timed epochs",
        "epoch (s)",
        "logging per epoch (ms)",
        "logging / epoch",
        "HTTP requests per epoch",
        f"logging / epoch < {TARGET_FRACTION:.0%}",
    ]
    requests = sorted(set(result.requests_per_epoch))
    row = [
        result.experiment,
        len(result.logging),
        _services.median(result.epoch_seconds),
        f"{logging_ms:.1f}",
        f"{fraction:.3%}",
        ", ".join(str(count) for count in requests),
        "yes" if fraction < TARGET_FRACTION else "no",
    ]
    _services.print_table(header, [row])
    print(f"metrics per epoch request: {result.n_metrics}")

    once = [
        ("run creation (run, params, config.json)", result.run_creation),
        ("training start (tags)", result.start),
        ("training end (summary, epochs.csv, figure6.png)", result.end),
    ]
    rows = [[name, f"{1000 * cost.seconds:.0f}", cost.requests] for name, cost in once]
    _services.print_table(["once per run", "time (ms)", "HTTP requests"], rows)
    _print_latencies(result.latencies)


def _print_latencies(latencies: dict[int, list[float]]) -> None:
    """Print the median, minimum and maximum time of the probe requests of each size."""
    rows = []
    for size, seconds in latencies.items():
        milliseconds = [1000 * value for value in seconds]
        rows.append(
            [
                size,
                len(milliseconds),
                f"{_services.median(milliseconds):.1f}",
                f"{min(milliseconds):.1f}",
                f"{max(milliseconds):.1f}",
            ]
        )
    header = ["metrics per log_batch", "requests", "median (ms)", "min (ms)", "max (ms)"]
    _services.print_table(header, rows)


if __name__ == "__main__":
    _services.run_script(main)
