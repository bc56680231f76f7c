"""Benchmark the trainer's overhead: an epoch through ``Trainer`` against a hand-written loop.

For each experiment the script trains one model with the ``mtl`` scheduler through
``Trainer.fit``, which logs every epoch to an MLflow server. It trains a copy of the same
model with the same data, batch size and seed through ``BaselineLoop``, a plain PyTorch
epoch with every task on. Both run in this process with the same torch threads. Their epochs
alternate (trainer epoch k, then baseline epoch k), so drift in the machine's load reaches
both. Epoch 1, the trainer's loss-estimation pass, is not timed, and the first training
epoch of each is a warm-up. Each timed epoch covers the training pass and the evaluation of
the validation and the test split. The trainer's epoch also covers the scheduler step and
the MLflow request of the epoch. The ratio is the median over epochs of trainer time over
baseline time, and the target is at most 1.05.

    python benchmarks/trainer_overhead.py
    python benchmarks/trainer_overhead.py --omniglot-data PATH/images_background.zip
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _services
import _training
import torch

from dst._experiment import Experiment
from dst._scheduler import make_scheduler
from dst._tracking import EpochLogger
from dst._trainer import (
    EpochRecord,
    TrainConfig,
    Trainer,
    resolve_config,
    resolve_device,
    seed_everything,
)

TARGET_RATIO = 1.05
EXPERIMENTS = ("shapes", "omniglot")
QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "shapes": {"n_samples": 120, "image_size": 16, "width": 4},
    "omniglot": {"width": 4},
}
"""Experiment options of ``--quick``: data and models small enough for a smoke test."""


@dataclass
class OverheadResult:
    """Timed epochs of one experiment, in epoch order."""

    experiment: str
    data: str
    trainer: list[_services.Reading]
    baseline: list[_services.Reading]

    @property
    def wall_ratio(self) -> float:
        """Median over the timed epochs of trainer over baseline wall-clock time."""
        return _services.median_ratio(
            [reading.wall for reading in self.trainer], [reading.wall for reading in self.baseline]
        )

    @property
    def cpu_ratio(self) -> float:
        """Median over the timed epochs of trainer over baseline CPU time."""
        return _services.median_ratio(
            [reading.cpu for reading in self.trainer], [reading.cpu for reading in self.baseline]
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time an epoch through the dst trainer (scheduler mtl, MLflow tracking"
        " on) against a hand-written PyTorch loop on the same model, data and batch size."
    )
    parser.add_argument(
        "--experiments",
        default=",".join(EXPERIMENTS),
        help=f"comma-separated experiments to measure (default: {','.join(EXPERIMENTS)})",
    )
    parser.add_argument(
        "--omniglot-data",
        help="Omniglot zip or folder (default: the experiment's generated demo data)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="EXPERIMENT.KEY=VALUE",
        help="experiment option (repeatable), such as shapes.n_samples=500",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed epochs of each loop (default: 5)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="batch size (default: the experiment's train_defaults)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's default for this machine)"
    )
    parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny data and 1 timed epoch, to check the script"
    )
    _services.add_service_arguments(parser)

    args = parser.parse_args(argv)
    _services.check_positive(args.repeats, "--repeats")
    if args.quick:
        args.repeats = 1
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, OverheadResult]:
    """Measure every experiment of ``--experiments`` and print the ratios."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(_services.check_positive(args.threads, "--threads"))
    options = _training.parse_experiment_options(args.option)
    names = [name.strip() for name in args.experiments.split(",") if name.strip()]
    _services.print_header("trainer overhead", Path(__file__).name, argv)
    results: dict[str, OverheadResult] = {}
    with tempfile.TemporaryDirectory(prefix="dst-overhead-") as folder:
        with _services.mlflow_tracking(args) as tracking:
            for name in names:
                experiment_options = {
                    **(QUICK_OPTIONS.get(name, {}) if args.quick else {}),
                    **options.get(name, {}),
                }
                data_dir = args.omniglot_data if name == "omniglot" else None
                experiment = _training.make_experiment(
                    name, experiment_options, data_dir, Path(folder)
                )
                results[name] = measure(experiment, tracking.url, args)
    print_results(results.values())
    return results


def measure(experiment: Experiment, tracking_uri: str, args: argparse.Namespace) -> OverheadResult:
    """Train the trainer and the baseline loop side by side and time their epochs."""
    warmup_epochs = 1
    config = resolve_config(
        TrainConfig(
            n_epochs=1 + warmup_epochs + args.repeats,
            batch_size=args.batch_size,
            seed=0,
            device=args.device,
        ),
        experiment,
    )
    seed_everything(config.seed)
    data = experiment.load(config.seed)
    model = experiment.build_model(data.tasks)
    data_text = _training.describe_data(data, int(config.batch_size or 0))
    print(f"{experiment.name}: {data_text}")

    baseline = _training.BaselineLoop(
        data,
        copy.deepcopy(model),
        float(config.lr or 0.0),
        int(config.batch_size or 0),
        resolve_device(config.device),
        config.seed,
    )
    baseline_seconds: dict[int, _services.Reading] = {}

    def run_baseline_epoch(trainer: Trainer, record: EpochRecord) -> None:
        if record.epoch > 1:
            baseline_seconds[record.epoch] = baseline.run_epoch(trainer.task_weights)

    scheduler = make_scheduler("mtl", data.tasks, seed=config.seed)
    study_name = f"benchmark-trainer-overhead-{uuid.uuid4().hex[:8]}"
    run = _training.create_tracked_run(tracking_uri, study_name, experiment, config, "mtl")
    clock = _training.EpochClock(between_epochs=run_baseline_epoch)
    callbacks = [EpochLogger(run.client, run.run_id, run.tree), clock]
    Trainer(data, model, scheduler, config, callbacks).fit()
    run.finish()

    timed = range(2 + warmup_epochs, config.n_epochs + 1)
    return OverheadResult(
        experiment=experiment.name,
        data=data_text,
        trainer=[clock.seconds[epoch] for epoch in timed],
        baseline=[baseline_seconds[epoch] for epoch in timed],
    )


def print_results(results: Iterable[OverheadResult]) -> None:
    """Print one row per experiment: median epoch times and the ratios against the target."""
    rows = []
    for result in results:
        rows.append(
            [
                result.experiment,
                len(result.trainer),
                _services.median([reading.wall for reading in result.trainer]),
                _services.median([reading.wall for reading in result.baseline]),
                f"{result.wall_ratio:.3f}",
                f"{result.cpu_ratio:.3f}",
                "yes" if result.wall_ratio <= TARGET_RATIO else "no",
            ]
        )
    header = [
        "experiment",
        "timed epochs",
        "trainer epoch (s)",
        "baseline epoch (s)",
        "wall-clock ratio",
        "CPU-time ratio",
        f"wall-clock ratio <= {TARGET_RATIO}",
    ]
    _services.print_table(header, rows)


if __name__ == "__main__":
    _services.run_script(main)
