"""Training aids shared by the benchmark scripts: experiments, tracked runs and a baseline loop.

:class:`BaselineLoop` is the reference that the trainer's overhead is measured against. It
is a plain PyTorch epoch over the same model, data and batch size with every task on. It
uses the same masked mean loss per task and Adam, then evaluates the validation and the test
split once. It reads its loss sums once per epoch, as the trainer does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _services import Reading  # the import puts the checkout's root on sys.path
from mlflow.tracking import MlflowClient
from torch import Tensor
from torch.utils.data import DataLoader

from dst._errors import UsageError
from dst._experiment import (
    Experiment,
    ExperimentData,
    MultiTaskModel,
    create_experiment,
    resolve_experiment,
)
from dst._names import TAG_RUN_TYPE, TAG_STUDY_NAME
from dst._tracking import FINISHED, RunSpec, RunTree, get_or_create_experiment
from dst._train_cli import parse_value
from dst._trainer import Callback, EpochRecord, TrainConfig, Trainer

_logger = logging.getLogger(__name__)

DATA_DIR_OPTION = "data_dir"
PAPER_LAMBDAS = (0.2, 0.2, 0.2, 0.2, 0.2)
PAPER_BETA = 0.1


def parse_experiment_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Parse ``EXPERIMENT.KEY=VALUE`` items into options per experiment name."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        name, dot, assignment = item.partition(".")
        key, equals, text = assignment.partition("=")
        if not dot or not equals or not name or not key:
            raise UsageError(
                f"invalid --option {item!r}; expected EXPERIMENT.KEY=VALUE, such as"
                " shapes.n_samples=500"
            )
        options.setdefault(name, {})[key] = parse_value(text)
    return options


def make_experiment(
    name: str, options: Mapping[str, Any], data_dir: str | None, folder: Path
) -> Experiment:
    """Create experiment ``name`` with ``options``, reading ``data_dir`` when it reads one.

    An experiment with a ``data_dir`` option and no ``data_dir`` given gets its generated
    demo data, written under ``folder``.
    """
    experiment_class = resolve_experiment(name)
    resolved = dict(options)
    if DATA_DIR_OPTION in experiment_class.defaults and DATA_DIR_OPTION not in resolved:
        if data_dir is None:
            demo_folder = folder / f"{name}-demo"
            demo_folder.mkdir(parents=True, exist_ok=True)
            resolved = {**experiment_class.demo(demo_folder), **resolved}
            print(f"{name}: no data folder given, so the run uses generated demo data")
        else:
            resolved[DATA_DIR_OPTION] = data_dir
    return create_experiment(name, resolved)


def describe_data(data: ExperimentData, batch_size: int) -> str:
    """Return the split sizes, the number of tasks and the batch size as text."""
    sizes = [len(split) for split in (data.train, data.validation, data.test)]  # type: ignore[arg-type]
    return (
        f"{sizes[0]} train, {sizes[1]} validation, {sizes[2]} test samples,"
        f" {len(data.tasks)} tasks, batch {batch_size}"
    )


@dataclass
class TrackedRun:
    """A RUNNING trial run under a study parent run, created as a worker creates them."""

    client: MlflowClient
    tree: RunTree
    parent_run_id: str
    run_id: str

    def finish(self) -> None:
        """End the trial run and its parent run FINISHED."""
        self.tree.finish(self.run_id)
        self.client.set_terminated(self.parent_run_id, FINISHED)


def create_tracked_run(
    tracking_uri: str, study_name: str, experiment: Experiment, config: TrainConfig, scheduler: str
) -> TrackedRun:
    """Create an MLflow experiment, a study parent run and one RUNNING trial run."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = get_or_create_experiment(client, study_name)
    tree = RunTree(client, experiment_id, study_name, trial_number=0)
    parent_tags = {TAG_RUN_TYPE: "study", TAG_STUDY_NAME: study_name}
    parent = client.create_run(experiment_id, tags=parent_tags, run_name=f"study {study_name}")
    spec = RunSpec(
        experiment=experiment.name,
        options=experiment.options,
        scheduler=scheduler,
        lambdas=PAPER_LAMBDAS,
        beta=PAPER_BETA,
        count_metric="proportional",
        p=0.5,
        seed=str(config.seed),
        n_epochs=config.n_epochs,
        lr=float(config.lr or 0.0),
        batch_size=int(config.batch_size or 0),
    )
    run_id = tree.create(parent.info.run_id, "trial", f"{scheduler} benchmark", spec)
    return TrackedRun(client, tree, parent.info.run_id, run_id)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochClock(Callback):
    """Trainer callback that times each epoch of ``fit``, callbacks before it included.

    Put it last among the callbacks. An epoch's time runs from the end of the previous
    call of this callback (or the start of training) to this call, so it covers the
    training pass, the scheduler step, evaluation, the checkpoint and the earlier callbacks.
    ``between_epochs`` runs after each epoch, outside both epochs' times.
    """

    between_epochs: Callable[[Trainer, EpochRecord], None] | None = None
    seconds: dict[int, Reading] = field(default_factory=dict)
    _started: Reading = Reading(0.0, 0.0)

    def on_train_start(self, trainer: Trainer) -> None:
        synchronize(trainer.device)
        self._started = Reading.now()

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        synchronize(trainer.device)
        self.seconds[record.epoch] = Reading.now() - self._started
        if self.between_epochs is not None:
            self.between_epochs(trainer, record)
        synchronize(trainer.device)
        self._started = Reading.now()


class BaselineLoop:
    """A hand-written MTL epoch over tensor inputs and outputs, see the module docstring.

    Args:
        data: The experiment's splits and tasks.
        model: A model of its own, not the trainer's, with the same initial weights.
        lr: Adam learning rate.
        batch_size: Training and evaluation batch size.
        device: Where the model and the batches live.
        seed: Seed of the shuffling of the training split.
    """

    def __init__(
        self,
        data: ExperimentData,
        model: MultiTaskModel,
        lr: float,
        batch_size: int,
        device: torch.device,
        seed: int,
    ) -> None:
        self.tasks = list(data.tasks)
        self.device = device
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        self.train_loader = DataLoader(
            data.train, batch_size=batch_size, shuffle=True, generator=generator
        )
        self.eval_loaders = [
            DataLoader(data.validation, batch_size=batch_size),
            DataLoader(data.test, batch_size=batch_size),
        ]
        self.last_losses: list[float] = []
        self.last_errors: list[list[float]] = []

    def run_epoch(self, weights: Tensor) -> Reading:
        """Train one epoch with task weights ``weights``, evaluate both splits, return the time."""
        synchronize(self.device)
        started = Reading.now()
        self.last_losses = self.train(weights.to(self.device))
        self.last_errors = [self.evaluate(loader) for loader in self.eval_loaders]
        synchronize(self.device)
        return Reading.now() - started

    def train(self, weights: Tensor) -> list[float]:
        """Run one optimised pass over the training split; return the mean loss per task."""
        self.model.train()
        loss_sums = torch.zeros(len(self.tasks), device=self.device)
        n_batches = 0
        for inputs, targets, mask in self.train_loader:
            inputs, mask = inputs.to(self.device), mask.to(self.device)
            features = self.model.shared(inputs)
            losses = torch.stack(
                [
                    self._task_loss(index, features, target.to(self.device), mask[:, index])
                    for index, target in enumerate(targets)
                ]
            )
            self.optimizer.zero_grad(set_to_none=True)
            (weights * losses).sum().backward()
            self.optimizer.step()
            loss_sums += losses.detach()
            n_batches += 1
        return (loss_sums / max(n_batches, 1)).tolist()

    def _task_loss(self, index: int, features: Any, target: Tensor, labelled: Tensor) -> Tensor:
        """Return the mean loss of task ``index`` over the labelled samples of the batch."""
        shape = (-1,) + (1,) * (target.dim() - 1)
        target = torch.where(labelled.view(shape), target, torch.zeros_like(target))
        per_sample = self.tasks[index].loss(self.model.heads[index](features), target)
        per_sample = torch.where(labelled, per_sample, torch.zeros_like(per_sample))
        return per_sample.sum() / labelled.sum().clamp(min=1)

    def evaluate(self, loader: DataLoader) -> list[float]:
        """Return the error in percent of each task on the split of ``loader``."""
        self.model.eval()
        metrics = [task.metric() for task in self.tasks]
        with torch.no_grad():
            for inputs, targets, mask in loader:
                outputs = self.model(inputs.to(self.device))
                mask = mask.to(self.device)
                for index, metric in enumerate(metrics):
                    labelled = mask[:, index]
                    if bool(labelled.any()):
                        target = targets[index].to(self.device)
                        metric.update(outputs[index][labelled], target[labelled])
        return [metric.compute()[1] for metric in metrics]
