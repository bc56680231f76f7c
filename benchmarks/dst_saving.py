"""Benchmark DST's compute saving: epoch time of the DST scheduler against MTL.

A task that DST drops for an epoch still runs its head forward, without building a graph,
so that its training loss is measured, but it gets no backward pass and Adam skips its
head's parameters. So a DST epoch should take at most as long as an MTL epoch of the same
model, and less the more tasks are off.

For each experiment the script trains two copies of one model with the same data, batch
size and seed: one with DST at the lambdas of Malhotra et al. (every lambda 0.2, beta 0.1;
"Dropped Scheduled Task", TMLR 2022) and one with MTL (every task on). Their epochs
alternate, and the order within each pair alternates too, so drift in the machine's load
reaches both. Epoch 1, the loss-estimation pass, and epoch 2 are not timed. The script
prints the median ratio of DST over MTL time, for the training pass alone and for the whole
epoch with evaluation, and the mean fraction of tasks on in DST's timed epochs.

The ``face`` experiment runs its ``small`` preset on generated AFLW-format faces unless
``--face-data`` names the AFLW folder.

    python benchmarks/dst_saving.py
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _services
import _training
import numpy as np
import torch

from dst._experiment import Experiment, create_experiment
from dst._scheduler import make_scheduler
from dst._trainer import TrainConfig, Trainer, resolve_config, seed_everything
from experiments._aflw_demo import write_demo_aflw

EXPERIMENTS = ("face", "shapes")
SCHEDULERS = ("dst", "mtl")
UNTIMED_EPOCHS = 2
QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "shapes": {"n_samples": 120, "image_size": 16, "width": 4},
    "face": {"image_size": 32},
}
"""Experiment options of ``--quick``: data and models small enough for a smoke test."""


@dataclass
class SchedulerTimes:
    """Timed epochs of one scheduler, in epoch order."""

    train_pass: list[_services.Reading] = field(default_factory=list)
    epoch: list[_services.Reading] = field(default_factory=list)
    active: list[np.ndarray] = field(default_factory=list)
    """Gates applied in each timed epoch, one bool per task."""


@dataclass
class SavingResult:
    """DST and MTL epoch times of one experiment."""

    experiment: str
    data: str
    task_names: list[str]
    times: dict[str, SchedulerTimes]

    def ratio(self, part: str, clock: str) -> float:
        """Median over the timed epochs of DST over MTL time of ``part``, on ``clock``.

        ``part`` is ``"train_pass"`` or ``"epoch"``; ``clock`` is ``"wall"`` or ``"cpu"``.
        """
        dst = [getattr(reading, clock) for reading in getattr(self.times["dst"], part)]
        mtl = [getattr(reading, clock) for reading in getattr(self.times["mtl"], part)]
        return _services.median_ratio(dst, mtl)

    @property
    def mean_fraction_on(self) -> float:
        """Mean over DST's timed epochs of the fraction of tasks whose gate was on."""
        return float(np.mean(self.times["dst"].active))

    @property
    def task_fractions_on(self) -> np.ndarray:
        """Fraction of DST's timed epochs in which each task's gate was on."""
        return np.mean(self.times["dst"].active, axis=0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time epochs of the DST scheduler (every lambda 0.2, beta 0.1) against"
        " MTL on the same model, data, batch size and seed."
    )
    parser.add_argument(
        "--experiments",
        default=",".join(EXPERIMENTS),
        help=f"comma-separated experiments to measure (default: {','.join(EXPERIMENTS)})",
    )
    parser.add_argument(
        "--face-data",
        help="AFLW folder with aflw.sqlite and flickr/ (default: generated faces)",
    )
    parser.add_argument(
        "--face-images",
        type=int,
        default=800,
        help="generated AFLW images, about 1.17 faces each, without --face-data (default: 800)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="EXPERIMENT.KEY=VALUE",
        help="experiment option (repeatable), such as face.image_size=96",
    )
    parser.add_argument(
        "--repeats", type=int, default=6, help="timed epochs of each scheduler (default: 6)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="batch size (default: the experiment's train_defaults)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's default for this machine)"
    )
    parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny data and 2 timed epochs, to check the script"
    )

    args = parser.parse_args(argv)
    _services.check_positive(args.repeats, "--repeats")
    _services.check_positive(args.face_images, "--face-images")
    if args.quick:
        args.repeats = 2
        args.face_images = min(args.face_images, 40)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, SavingResult]:
    """Measure every experiment of ``--experiments`` and print the ratios."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(_services.check_positive(args.threads, "--threads"))
    options = _training.parse_experiment_options(args.option)
    names = [name.strip() for name in args.experiments.split(",") if name.strip()]
    _services.print_header("DST compute saving", Path(__file__).name, argv)
    results: dict[str, SavingResult] = {}
    with tempfile.TemporaryDirectory(prefix="dst-saving-") as folder:
        for name in names:
            experiment_options = {
                **(QUICK_OPTIONS.get(name, {}) if args.quick else {}),
                **options.get(name, {}),
            }
            experiment = make_experiment(name, experiment_options, args, Path(folder))
            results[name] = measure(experiment, args)
    print_results(results.values())
    return results


def make_experiment(
    name: str, options: dict[str, Any], args: argparse.Namespace, folder: Path
) -> Experiment:
    """Create the experiment; ``face`` gets the small preset and generated faces by default."""
    if name != "face":
        return _training.make_experiment(name, options, None, folder)
    data_dir = args.face_data
    if data_dir is None:
        data_dir = str(write_demo_aflw(folder / "aflw", n_images=args.face_images, seed=0))
        print(f"face: {args.face_images} generated AFLW images in {data_dir}")
    return create_experiment("face", {"preset": "small", "data_dir": data_dir, **options})


def measure(experiment: Experiment, args: argparse.Namespace) -> SavingResult:
    """Train DST and MTL side by side and time their epochs after the untimed ones."""
    config = resolve_config(
        TrainConfig(
            n_epochs=UNTIMED_EPOCHS + args.repeats,
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

    trainers = {}
    for name in SCHEDULERS:
        scheduler = make_scheduler(
            name,
            data.tasks,
            lambdas=_training.PAPER_LAMBDAS,
            beta=_training.PAPER_BETA,
            seed=config.seed,
        )
        trainers[name] = Trainer(data, copy.deepcopy(model), scheduler, config)
    times = {name: SchedulerTimes() for name in SCHEDULERS}
    for epoch in range(1, config.n_epochs + 1):
        # Alternate which scheduler goes first, so that neither always follows the other.
        order = SCHEDULERS if epoch % 2 else tuple(reversed(SCHEDULERS))
        for name in order:
            train_pass, whole, active = _timed_epoch(trainers[name], epoch)
            if epoch > UNTIMED_EPOCHS:
                times[name].train_pass.append(train_pass)
                times[name].epoch.append(whole)
                times[name].active.append(active)
    task_names = [task.name for task in data.tasks]
    return SavingResult(experiment.name, data_text, task_names, times)


def _timed_epoch(
    trainer: Trainer, epoch: int
) -> tuple[_services.Reading, _services.Reading, np.ndarray]:
    """Run one epoch as ``Trainer.fit`` does; return the pass and epoch times and the gates."""
    train_pass: list[_services.Reading] = []
    train_epoch = trainer.train_epoch

    def timed_train_epoch(epoch: int, active: np.ndarray) -> Any:
        _training.synchronize(trainer.device)
        started = _services.Reading.now()
        result = train_epoch(epoch, active)
        _training.synchronize(trainer.device)
        train_pass.append(_services.Reading.now() - started)
        return result

    trainer.train_epoch = timed_train_epoch  # type: ignore[method-assign]
    try:
        _training.synchronize(trainer.device)
        started = _services.Reading.now()
        record = trainer.run_epoch(epoch)
        _training.synchronize(trainer.device)
        whole = _services.Reading.now() - started
    finally:
        del trainer.train_epoch
    trainer.records.append(record)
    return train_pass[0], whole, record.active


def print_results(results: Iterable[SavingResult]) -> None:
    """Print one row per experiment: median times, the DST/MTL ratios and the tasks on."""
    results = list(results)
    rows = []
    for result in results:
        dst, mtl = result.times["dst"], result.times["mtl"]
        rows.append(
            [
                result.experiment,
                len(dst.epoch),
                f"{result.mean_fraction_on:.2f}",
                _services.median([reading.wall for reading in dst.train_pass]),
                _services.median([reading.wall for reading in mtl.train_pass]),
                f"{result.ratio('train_pass', 'wall'):.3f}",
                f"{result.ratio('train_pass', 'cpu'):.3f}",
                f"{result.ratio('epoch', 'wall'):.3f}",
                f"{result.ratio('epoch', 'cpu'):.3f}",
            ]
        )
    header = [
        "experiment",
        "timed epochs",
        "DST tasks on",
        "DST pass (s)",
        "MTL pass (s)",
        "pass ratio, wall",
        "pass ratio, CPU",
        "epoch ratio, wall",
        "epoch ratio, CPU",
    ]
    _services.print_table(header, rows)
    for result in results:
        fractions = ", ".join(
            f"{name} {fraction:.2f}"
            for name, fraction in zip(result.task_names, result.task_fractions_on, strict=True)
        )
        print(f"{result.experiment}: fraction of DST's timed epochs with the task on: {fractions}")
    print(
        "DST tasks on: mean fraction of gates on in DST's timed epochs. pass: the training"
        " pass; epoch: the pass, the scheduler step and the evaluation of both splits."
        " Ratios are DST over MTL, the median over the timed epochs; 1 or less means DST is"
        " not slower."
    )


if __name__ == "__main__":
    _services.run_script(main)
