"""The ``dst train`` command: train one experiment with one scheduler and print the results."""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dst._errors import UsageError
from dst._scheduler import COUNT_METRICS, DEFAULT_LAMBDAS, SCHEDULER_NAMES, parse_lambdas

if TYPE_CHECKING:
    import pandas as pd

    from dst._experiment import Experiment
    from dst._trainer import Callback, TrainConfig, Trainer, TrainResult

_logger = logging.getLogger(__name__)

DEMO_FOLDER = "demo-data"
"""Folder under ``--output-dir`` that receives the experiment's demo data set."""

EPOCHS_FILE = "epochs.csv"
"""File under ``--output-dir`` with one row of :meth:`EpochRecord.as_dict` per epoch."""


def add_parser(commands: Any) -> None:
    """Add the ``train`` subcommand to ``commands``, the subparsers of the ``dst`` parser."""
    parser = commands.add_parser(
        "train",
        help="train one experiment with one scheduler",
        description=(
            "Train an experiment with DST or a baseline scheduler, show each epoch's losses,"
            " gates and errors, and print the per-task errors at the best validation epoch."
        ),
    )
    _add_experiment_arguments(parser)
    _add_scheduler_arguments(parser)
    _add_training_arguments(parser)
    _add_output_arguments(parser)
    parser.set_defaults(handler=run_train)


def _add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("experiment")
    group.add_argument(
        "--experiment",
        required=True,
        help="built-in experiment (shapes, omniglot, face, fingerprint) or 'package.module:Name'",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        help="data folder or archive, passed as the experiment option data_dir (default: none)",
    )
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="other experiment option; VALUE is read as int, float, true/false or text."
        " Repeat for several options (default: none)",
    )
    group.add_argument(
        "--demo",
        action="store_true",
        help="generate the experiment's small demo data set under OUTPUT_DIR/demo-data"
        " and train on it (default: off)",
    )


def _add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scheduler")
    group.add_argument(
        "--scheduler",
        choices=SCHEDULER_NAMES,
        default="dst",
        help="scheduler: dst (dropped scheduled task), mtl (every task always on), random"
        " (each task on with probability P) or stl (one task alone) (default: %(default)s)",
    )
    group.add_argument(
        "--lambdas",
        default=",".join(f"{value:g}" for value in DEFAULT_LAMBDAS),
        help="DST weights of the depth, count, incompleteness, stagnancy and regularizer"
        " terms, five comma-separated numbers that sum to 1; write --lambdas=... when the"
        " first is negative (default: %(default)s)",
    )
    group.add_argument(
        "--beta",
        type=float,
        default=0.1,
        help="DST discount of the rate-of-fall moving average, in [0, 1] (default: %(default)s)",
    )
    group.add_argument(
        "--count-metric",
        choices=COUNT_METRICS,
        default="proportional",
        help="DST count term: c_t / max c (proportional) or min c / c_t (inverse)"
        " (default: %(default)s)",
    )
    group.add_argument(
        "--p",
        type=float,
        default=0.5,
        help="probability that a task is on in an epoch, in (0, 1], for --scheduler random"
        " (default: %(default)s)",
    )
    group.add_argument(
        "--stl-task",
        metavar="NAME",
        help="name of the task that --scheduler stl trains alone (default: none)",
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--n-epochs",
        type=int,
        default=10,
        help="number of epochs, counting epoch 1, the loss-estimation pass that updates"
        " nothing (default: %(default)s)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the model, data order, validation split and gates (default: %(default)s)",
    )
    group.add_argument(
        "--lr",
        type=float,
        help="Adam learning rate (default: the experiment's own)",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        help="samples per batch (default: the experiment's own)",
    )
    group.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
        " (default: %(default)s)",
    )
    group.add_argument(
        "--bf16",
        action="store_true",
        help="run forward passes under bf16 autocast, on CUDA only (default: off)",
    )
    group.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader worker processes; 0 loads in the main process (default: %(default)s)",
    )
    group.add_argument(
        "--pin-memory",
        action="store_true",
        help="pin host memory of batches, on CUDA only (default: off)",
    )
    group.add_argument(
        "--no-static-weights",
        action="store_true",
        help="do not scale task losses by w_t = mean(V1) / V1_t (default: scaled)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output-dir",
        type=Path,
        help="folder of the checkpoint last.pt, epochs.csv and demo data"
        " (default: runs/<experiment>-<scheduler>-<seed>)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --output-dir (default: start over)",
    )


def run_train(args: argparse.Namespace) -> int:
    """Run ``dst train`` from parsed arguments and print the results to stdout."""
    lambdas = _check_arguments(args)
    # Imported once the arguments are checked, so that their errors do not wait for torch.
    from dst._experiment import create_experiment, resolve_experiment
    from dst._trainer import CHECKPOINT_NAME, train_experiment

    experiment_class = resolve_experiment(args.experiment)
    output_dir = output_dir_of(args)
    checkpoint = output_dir / CHECKPOINT_NAME
    if args.resume and not checkpoint.is_file():
        raise UsageError(
            f"no checkpoint to resume at {str(checkpoint)!r}; run without --resume first"
            " or give the --output-dir of the run"
        )

    options = parse_options(args.option)
    if args.data_dir is not None:
        options["data_dir"] = str(args.data_dir)
    if args.demo:
        demo_options = experiment_class.demo(output_dir / DEMO_FOLDER)
        options = {**demo_options, **options}
    experiment = create_experiment(args.experiment, options)
    if not args.resume and checkpoint.is_file():
        _logger.warning(
            "starting over: %s will be overwritten; use --resume to continue", checkpoint
        )

    try:
        trainer, result = train_experiment(
            experiment,
            args.scheduler,
            _train_config(args, output_dir),
            lambdas=lambdas,
            beta=args.beta,
            count_metric=args.count_metric,
            p=args.p,
            stl_task=args.stl_task,
            callbacks=build_callbacks(args, experiment),
            resume_from=checkpoint if args.resume else None,
        )
    except KeyboardInterrupt:
        if checkpoint.is_file():
            _logger.warning(
                "stopped; %s contains the finished epochs, so run the same command with --resume"
                " to continue",
                checkpoint,
            )
        raise
    _write_epochs(trainer, output_dir / EPOCHS_FILE)
    print_results(trainer, result)
    return 0


def build_callbacks(args: argparse.Namespace, experiment: Experiment) -> list[Callback]:
    """Return the callbacks of a ``dst train`` run, built from its arguments.

    Options that observe the run, such as logging it to a tracking server, add their
    callbacks here.
    """
    del args, experiment
    return []


def output_dir_of(args: argparse.Namespace) -> Path:
    """Return ``--output-dir``, or ``runs/<experiment>-<scheduler>-<seed>`` by default."""
    if args.output_dir is not None:
        return Path(args.output_dir)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.experiment).strip("_.") or "experiment"
    return Path("runs") / f"{slug}-{args.scheduler}-{args.seed}"


def parse_options(items: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` items into experiment options, reading each value's type."""
    options: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        key = key.strip()
        if not separator or not key:
            raise UsageError(
                f"invalid --option {item!r}; expected KEY=VALUE, such as n_samples=200"
            )
        options[key] = parse_value(text.strip())
    return options


def parse_value(text: str) -> int | float | bool | str:
    """Read ``text`` as an int, a float, a bool (true/false, any case) or else as text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def _check_arguments(args: argparse.Namespace) -> tuple[float, ...]:
    """Check the arguments that need no data and return the parsed lambdas."""
    lambdas = parse_lambdas(args.lambdas)
    _check_numbers(args)

    if args.scheduler == "stl" and not args.stl_task:
        raise UsageError("--scheduler stl needs --stl-task NAME, the task to train alone")
    if args.demo and args.data_dir is not None:
        raise UsageError("--demo generates its own data; drop --data-dir or --demo")
    if args.output_dir is not None and Path(args.output_dir).is_file():
        raise UsageError(
            f"--output-dir {str(args.output_dir)!r} is a file; give a folder for the"
            " checkpoint and epochs.csv"
        )
    if args.data_dir is not None and not args.data_dir.exists():
        raise UsageError(f"data folder {str(args.data_dir)!r} not found; check --data-dir")
    from dst._trainer import resolve_device

    resolve_device(args.device)
    return lambdas


def _check_numbers(args: argparse.Namespace) -> None:
    """Raise UsageError for the first numeric option outside its range."""
    checks = [
        (
            "--n-epochs",
            args.n_epochs,
            args.n_epochs >= 2,
            "at least 2, because epoch 1 only measures the losses",
        ),
        ("--beta", args.beta, 0.0 <= args.beta <= 1.0, "a number in [0, 1]"),
        ("--p", args.p, 0.0 < args.p <= 1.0, "a probability in (0, 1], since 0 trains nothing"),
        ("--num-workers", args.num_workers, args.num_workers >= 0, "0 or more"),
    ]
    if args.lr is not None:
        checks.append(("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "positive"))
    if args.batch_size is not None:
        checks.append(("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"))
    for option, value, valid, expected in checks:
        if not valid:
            raise UsageError(f"invalid {option} {value}; expected {expected}")


def _train_config(args: argparse.Namespace, output_dir: Path) -> TrainConfig:
    from dst._trainer import TrainConfig

    return TrainConfig(
        n_epochs=args.n_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        num_workers=args.num_workers,
        pin_memory=args.pin_memory,
        static_weights=not args.no_static_weights,
        checkpoint_dir=output_dir,
        show_progress=True,
    )


def _write_epochs(trainer: Trainer, path: Path) -> None:
    from dst._trainer import epochs_table

    names = [task.name for task in trainer.tasks]
    epochs_table(trainer.records, names).to_csv(path, index=False)
    _logger.info("wrote %s", path)


def print_results(trainer: Trainer, result: TrainResult) -> None:
    """Print the gates of every epoch and the per-task table at the best epoch."""
    print("Gates applied in each epoch (1 = task trained; epoch 1 estimates the losses):")
    print(gate_table(trainer, result).to_string())
    print()
    print(
        f"Best epoch {result.best_epoch} (lowest validation average error):"
        f" validation {result.best_val_avg_error:.2f} %,"
        f" test {result.test_avg_error_at_best:.2f} %"
    )
    print(task_table(trainer, result).to_string(index=False))


def gate_table(trainer: Trainer, result: TrainResult) -> pd.DataFrame:
    """Return one row per epoch: whether it updated, each task's gate and the average errors."""
    import pandas as pd

    rows = []
    for record in result.records:
        row: dict[str, Any] = {"epoch": record.epoch, "updated": int(record.updated)}
        for task, on in zip(trainer.tasks, record.active, strict=True):
            row[task.name] = int(on)
        row["val avg error %"] = round(record.val_avg_error, 2)
        row["test avg error %"] = round(record.test_avg_error, 2)
        rows.append(row)
    return pd.DataFrame(rows).set_index("epoch")


def task_table(trainer: Trainer, result: TrainResult) -> pd.DataFrame:
    """Return one row per task with its metric and errors at the best epoch.

    The fraction of epochs on counts the training epochs, 2 to ``n_epochs``, and is NaN for
    a run of one epoch.
    """
    import pandas as pd

    training = [record.active for record in result.records if record.epoch > 1]
    fraction_on = np.mean(training, axis=0) if training else np.full(len(trainer.tasks), np.nan)
    return pd.DataFrame(
        {
            "task": [task.name for task in trainer.tasks],
            "metric": [task.metric().name for task in trainer.tasks],
            "test metric": result.test_metrics_at_best.round(3),
            "val error %": result.best_val_errors.round(2),
            "test error %": result.test_errors_at_best.round(2),
            "fraction of epochs on": np.round(fraction_on, 2),
        }
    )
