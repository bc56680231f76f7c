"""The multi-task trainer: gated task losses, per-epoch evaluation and exact checkpoints.

Epoch timeline (see ``docs/design.md``). Epoch 1 is the loss-estimation pass: every head
runs forward in training mode and no parameter is updated, though normalisation layers
still update their running statistics. It measures the mean losses ``V(1, t)`` and, when
``TrainConfig.static_weights`` is set, the static scale ``w_t = mean(V1) / V1_t``. At the end
of every epoch ``k`` the trainer passes ``V(k)`` to ``scheduler.step``, whose gates switch
the tasks on or off for epoch ``k + 1``, then evaluates on the validation and the test split,
writes a checkpoint and calls the callbacks.

The loss of a batch is ``sum_t G_t * w_t * mean_t``, where ``mean_t`` is the mean per-sample
loss of task ``t`` over the samples of the batch labelled for it and ``G_t`` is the task's
gate. The head of a dropped task still runs forward, under ``torch.no_grad()``, so its
training loss is measured while it builds no graph and gets no gradient.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dst._errors import DivergedError, UsageError
from dst._experiment import Experiment, ExperimentData, MultiTaskModel, Task
from dst._signals import deferred_signals

if TYPE_CHECKING:
    import pandas as pd

    from dst._scheduler import Scheduler

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
"""File name of the checkpoint that the trainer writes into ``checkpoint_dir`` every epoch."""

_CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Settings of one training run.

    Attributes:
        n_epochs: Number of epochs, counting epoch 1, the loss-estimation pass.
        lr: Adam learning rate. None takes ``experiment.train_defaults["lr"]``.
        batch_size: Training and evaluation batch size. None takes
            ``experiment.train_defaults["batch_size"]``.
        seed: Seed of the data order, the model initialisation and the scheduler's gates.
        device: ``"auto"`` (CUDA when available, else CPU) or a torch device string.
        bf16: Whether to run forward passes under bf16 autocast. Only applies on CUDA.
        num_workers: DataLoader worker processes.
        pin_memory: Whether the DataLoader pins host memory. Only applies on CUDA.
        static_weights: Whether to scale task losses by ``w_t = mean(V1) / V1_t``.
        checkpoint_dir: Folder that receives ``last.pt`` after every epoch, or None for no
            checkpoint.
        show_progress: Whether to show a tqdm bar over the batches of each epoch on stderr,
            when stderr is a terminal.
    """

    n_epochs: int = 10
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    static_weights: bool = True
    checkpoint_dir: Path | None = None
    show_progress: bool = False


@dataclass
class EpochRecord:
    """Everything measured in one epoch, with arrays of shape ``(n_tasks,)`` in task order.

    Attributes:
        epoch: 1-based epoch number.
        updated: Whether the epoch made an optimizer step. False at epoch 1 and in an epoch
            with every gate off.
        active: Gates applied during this epoch (all false at epoch 1).
        train_losses: Mean training loss ``V(k, t)`` of each task.
        probabilities: ``P(k, t)`` of the scheduler after its step on ``train_losses``.
        components: The scheduler's probability terms by name (empty for the baselines).
        gates: Gates drawn from ``probabilities``, applied during epoch ``k + 1``.
        val_metrics: Metric value of each task on the validation split.
        val_errors: Error in percent of each task on the validation split.
        val_avg_error: Mean of ``val_errors`` over the tasks, NaN values ignored.
        test_metrics: Metric value of each task on the test split.
        test_errors: Error in percent of each task on the test split.
        test_avg_error: Mean of ``test_errors`` over the tasks, NaN values ignored.
        seconds: Wall time of the epoch, training and evaluation.
    """

    epoch: int
    updated: bool
    active: np.ndarray
    train_losses: np.ndarray
    probabilities: np.ndarray
    components: dict[str, np.ndarray]
    gates: np.ndarray
    val_metrics: np.ndarray
    val_errors: np.ndarray
    val_avg_error: float
    test_metrics: np.ndarray
    test_errors: np.ndarray
    test_avg_error: float
    seconds: float

    def as_dict(self, task_names: Sequence[str]) -> dict[str, float]:
        """Return the record as a flat dict of floats, one CSV row, keyed ``<value>/<task>``.

        Probability terms are keyed ``p_<term>/<task>``, such as ``p_depth/<task>``.
        """
        row: dict[str, float] = {
            "epoch": float(self.epoch),
            "updated": float(self.updated),
            "val_avg_error": self.val_avg_error,
            "test_avg_error": self.test_avg_error,
            "epoch_seconds": self.seconds,
        }
        per_task = {
            "active": self.active,
            "train_loss": self.train_losses,
            "probability": self.probabilities,
            "gate": self.gates,
            **{f"p_{name}": values for name, values in self.components.items()},
            "val_metric": self.val_metrics,
            "val_error": self.val_errors,
            "test_metric": self.test_metrics,
            "test_error": self.test_errors,
        }
        for prefix, values in per_task.items():
            for name, value in zip(task_names, values, strict=True):
                row[f"{prefix}/{name}"] = float(value)
        return row

    def to_state(self) -> dict[str, Any]:
        """Return the record as Python builtins, loadable by ``torch.load(weights_only=True)``."""
        state: dict[str, Any] = {}
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray):
                state[name] = value.tolist()
            elif name == "components":
                state[name] = {key: array.tolist() for key, array in value.items()}
            else:
                state[name] = value
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> EpochRecord:
        """Rebuild a record written by :meth:`to_state`."""
        bool_fields = ("active", "gates")
        float_fields = (
            "train_losses",
            "probabilities",
            "val_metrics",
            "val_errors",
            "test_metrics",
            "test_errors",
        )
        values = dict(state)
        for name in bool_fields:
            values[name] = np.asarray(values[name], dtype=bool)
        for name in float_fields:
            values[name] = np.asarray(values[name], dtype=float)
        values["components"] = {
            key: np.asarray(array, dtype=float) for key, array in values["components"].items()
        }
        return cls(**values)


class Callback:
    """Hooks into a training run. The base class does nothing, so override the hooks you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Run before the first epoch of ``fit``, also after a resume."""

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        """Run after each epoch's checkpoint.

        An exception raised here, such as ``optuna.TrialPruned``, stops training because the
        trainer does not catch it.
        """

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """Run after each checkpoint has been written to ``path``."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """Run after the last epoch with the result of the run."""


@dataclass
class TrainResult:
    """The records of a run and the values at its best epoch, chosen on validation.

    Attributes:
        records: One record per epoch, in order.
        best_epoch: Epoch with the lowest ``val_avg_error``, the first one on ties. The test
            split never takes part in the choice.
        best_val_avg_error: ``val_avg_error`` at the best epoch.
        test_avg_error_at_best: ``test_avg_error`` at the best epoch.
        best_val_errors: Validation error per task at the best epoch.
        test_errors_at_best: Test error per task at the best epoch.
        test_metrics_at_best: Test metric value per task at the best epoch.
    """

    records: list[EpochRecord]
    best_epoch: int
    best_val_avg_error: float
    test_avg_error_at_best: float
    best_val_errors: np.ndarray
    test_errors_at_best: np.ndarray
    test_metrics_at_best: np.ndarray

    @classmethod
    def from_records(
        cls, records: Sequence[EpochRecord], trained: np.ndarray | None = None
    ) -> TrainResult:
        """Pick the best epoch of ``records`` on the validation average error.

        ``trained`` masks the tasks that the scheduler can switch on. When it leaves some
        out, as STL does, the best epoch is chosen on the mean validation error of the
        trained tasks alone, so the untrained heads cannot pick an untrained model.
        Epochs whose error is NaN are never chosen unless every epoch's is, in which case
        the last epoch counts as the best.
        """
        if not records:
            raise ValueError("cannot summarise a run without epochs; train at least one epoch")
        if trained is None or trained.all() or not trained.any():
            val_avg_errors = np.array([record.val_avg_error for record in records], dtype=float)
        else:
            val_avg_errors = np.array(
                [_nanmean_or_nan(record.val_errors[trained]) for record in records], dtype=float
            )
        if np.isnan(val_avg_errors).all():
            best = records[-1]
        else:
            best = records[int(np.nanargmin(val_avg_errors))]
        return cls(
            records=list(records),
            best_epoch=best.epoch,
            best_val_avg_error=best.val_avg_error,
            test_avg_error_at_best=best.test_avg_error,
            best_val_errors=best.val_errors.copy(),
            test_errors_at_best=best.test_errors.copy(),
            test_metrics_at_best=best.test_metrics.copy(),
        )


def _nanmean_or_nan(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``name``: ``"auto"`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(
            f"invalid device {name!r}: {error}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available; use 'cpu'")
    return device


def average_error(errors: np.ndarray) -> float:
    """Return the mean of the per-task errors, ignoring NaN, or NaN when all are NaN."""
    finite = errors[~np.isnan(errors)]
    return float(finite.mean()) if finite.size else math.nan


def static_task_weights(first_losses: np.ndarray, *, enabled: bool) -> np.ndarray:
    """Return the static scale ``w_t = mean(V1) / V1_t`` of each task, or ones if not enabled.

    A task whose first loss ``V1_t`` is 0 gets ``w_t = 1``, since no scale brings a zero
    loss to the mean.
    """
    weights = np.ones(len(first_losses))
    if enabled:
        positive = first_losses > 0
        weights[positive] = first_losses.mean() / first_losses[positive]
    return weights


def epoch_seed(seed: int, epoch: int) -> int:
    """Return the seed of the data order of ``epoch``, a function of ``(seed, epoch)`` only."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Trainer:
    """Train a multi-task model with one scheduler gate per task and epoch.

    Attributes:
        tasks: The experiment's tasks, in head order.
        model: The multi-task model, moved to ``device``.
        scheduler: Draws the gates of the next epoch from each epoch's training losses.
        config: The run's settings, with ``lr`` and ``batch_size`` resolved.
        device: Where the model and the batches live.
        records: One record per finished epoch.
        optimizer: Adam over every parameter of the model.
        task_weights: Static scale ``w_t`` per task (ones until epoch 1 has measured ``V1``).
        gates: Gates drawn at the end of the last finished epoch, applied in the next one.
        callbacks: Hooks called at the start, after each epoch and checkpoint, and at the end.
    """

    def __init__(
        self,
        data: ExperimentData,
        model: MultiTaskModel,
        scheduler: Scheduler,
        config: TrainConfig,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        lr, batch_size = _check_config(config)

        if len(model.heads) != len(data.tasks):
            raise UsageError(
                f"the model has {len(model.heads)} heads but the experiment has"
                f" {len(data.tasks)} tasks; build_model must return one head per task"
            )
        if scheduler.n_tasks != len(data.tasks):
            raise UsageError(
                f"the scheduler has {scheduler.n_tasks} tasks but the experiment has"
                f" {len(data.tasks)}; build the scheduler from the experiment's tasks"
            )

        self.data = data
        self.tasks: list[Task] = list(data.tasks)
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.scheduler = scheduler
        self.run_settings: dict[str, str] = {}
        """Settings compared with a checkpoint's on resume; ``train_experiment`` fills it."""
        # Tasks the scheduler can switch on; STL trains one, so the others cannot pick the
        # best epoch.
        self.trained_tasks = np.asarray(scheduler.probabilities) > 0
        self.callbacks = list(callbacks)
        self.records: list[EpochRecord] = []
        # PyTorch picks the multi-tensor (foreach) Adam only on CUDA by default. On a 2-core
        # CPU it stepped the shapes model about 3.5 times faster than the per-parameter loop.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, foreach=True)
        self.task_weights = torch.ones(len(self.tasks), device=self.device)
        self.gates = np.zeros(len(self.tasks), dtype=bool)
        self._bf16 = config.bf16 and self.device.type == "cuda"
        self._pin_memory = config.pin_memory and self.device.type == "cuda"
        self._log_ignored_options()

        self._batch_size = batch_size
        self._generator = torch.Generator()
        self._train_loader = self._make_loader(data.train, shuffle=True)
        self._eval_loaders = {
            "validation": self._make_loader(data.validation, shuffle=False),
            "test": self._make_loader(data.test, shuffle=False),
        }

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def checkpoint_path(self) -> Path | None:
        """Path of the checkpoint written every epoch, or None without ``checkpoint_dir``."""
        if self.config.checkpoint_dir is None:
            return None
        return Path(self.config.checkpoint_dir) / CHECKPOINT_NAME

    def fit(self) -> TrainResult:
        """Train up to ``config.n_epochs`` epochs, continuing after any resumed epochs."""
        for callback in self.callbacks:
            callback.on_train_start(self)
        for epoch in range(len(self.records) + 1, self.config.n_epochs + 1):
            record = self.run_epoch(epoch)
            self.records.append(record)
            self._save_checkpoint()
            for callback in self.callbacks:
                callback.on_epoch_end(self, record)
        result = TrainResult.from_records(self.records, self.trained_tasks)
        _logger.info(
            "best epoch %d: validation average error %.2f%%, test average error %.2f%%",
            result.best_epoch,
            result.best_val_avg_error,
            result.test_avg_error_at_best,
        )
        for callback in self.callbacks:
            callback.on_train_end(self, result)
        return result

    def run_epoch(self, epoch: int) -> EpochRecord:
        """Train one epoch, step the scheduler and evaluate on both splits."""
        start = time.perf_counter()
        active = self.gates.copy() if epoch > 1 else np.zeros(self.n_tasks, dtype=bool)
        updated = bool(active.any())
        if epoch > 1 and not updated:
            _logger.info("epoch %d: every gate is off, so the epoch makes no update", epoch)

        train_losses, n_batches = self.train_epoch(epoch, active)
        self._check_losses(train_losses, n_batches, epoch)
        if epoch == 1:
            self._set_task_weights(train_losses)
        self.gates = np.asarray(self.scheduler.step(train_losses), dtype=bool).copy()

        val_metrics, val_errors = self.evaluate("validation")
        test_metrics, test_errors = self.evaluate("test")
        record = EpochRecord(
            epoch=epoch,
            updated=updated,
            active=active,
            train_losses=train_losses,
            probabilities=np.array(self.scheduler.probabilities, dtype=float),
            components={
                name: np.array(values, dtype=float)
                for name, values in self.scheduler.components.items()
            },
            gates=self.gates.copy(),
            val_metrics=val_metrics,
            val_errors=val_errors,
            val_avg_error=average_error(val_errors),
            test_metrics=test_metrics,
            test_errors=test_errors,
            test_avg_error=average_error(test_errors),
            seconds=time.perf_counter() - start,
        )
        self._log_record(record)
        return record

    def train_epoch(self, epoch: int, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run one pass over the training split and return the mean loss of each task.

        Only the tasks in ``active`` are trained. With no active task, the pass runs forward
        under ``torch.no_grad()`` and updates no parameter. Returns ``(losses, n_batches)``:
        ``V(k, t)``, the mean over the batches that have labels for task ``t`` of its batch
        loss, and the number of those batches (NaN and 0 for a task without labels). Loss
        sums and batch counts stay on the device and are read once, at the end.
        """
        self.model.train()
        self._generator.manual_seed(epoch_seed(self.config.seed, epoch))
        loss_sums = torch.zeros(self.n_tasks, device=self.device)
        n_batches = torch.zeros(self.n_tasks, device=self.device)
        update = bool(active.any())
        active_weights = self.task_weights * torch.as_tensor(active, device=self.device)
        for batch in self._progress(self._train_loader, epoch):
            inputs, targets, mask = self._to_device(batch)
            with self._grad_context(update), self._autocast():
                losses = self.task_losses(inputs, targets, mask, active)
            if update:
                self._optimizer_step(losses, active_weights, active)
            loss_sums += torch.stack([loss.detach().float() for loss in losses])
            n_batches += mask.any(dim=0).float()

        totals = torch.stack([loss_sums, n_batches]).cpu().numpy().astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_losses = np.where(totals[1] > 0, totals[0] / totals[1], math.nan)
        return mean_losses, totals[1]

    def task_losses(
        self, inputs: Any, targets: Sequence[Tensor], mask: Tensor, active: np.ndarray
    ) -> list[Tensor]:
        """Return each task's mean per-sample loss over the samples labelled for it.

        Unlabelled samples never reach the result, not even a NaN placeholder: their targets
        are replaced by zeros before the loss, and their losses by zeros after it. A task
        with no labelled sample in the batch gets a loss of 0. Heads of tasks not in
        ``active`` run under ``torch.no_grad()``.
        """
        features = self.model.shared(inputs)
        losses = []
        for index, (task, head) in enumerate(zip(self.tasks, self.model.heads, strict=True)):
            labelled = mask[:, index]
            target = _zero_unlabelled(targets[index], labelled)
            context = nullcontext() if active[index] else torch.no_grad()
            with context:
                per_sample = task.loss(head(features), target)
                # Shapes are metadata on the host, so this check costs no device sync. A loss of
                # shape (batch, 1) would broadcast against the mask and train on nonsense.
                if per_sample.shape != labelled.shape:
                    raise UsageError(
                        f"the loss of task {task.name!r} returned shape"
                        f" {tuple(per_sample.shape)}, expected {tuple(labelled.shape)}, one"
                        " value per sample; reduce over the other dimensions and not the batch"
                    )
                labelled_losses = torch.where(labelled, per_sample, torch.zeros_like(per_sample))
                losses.append(labelled_losses.sum() / labelled.sum().clamp(min=1))
        return losses

    def evaluate(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Return the metric value and the error in percent of each task on ``split``.

        ``split`` is ``"validation"`` or ``"test"``. Each metric receives only the samples
        labelled for its task.
        """
        self.model.eval()
        metrics = [task.metric() for task in self.tasks]
        with torch.no_grad():
            for batch in self._eval_loaders[split]:
                inputs, targets, mask = self._to_device(batch)
                with self._autocast():
                    features = self.model.shared(inputs)
                    outputs = [head(features) for head in self.model.heads]
                for index, metric in enumerate(metrics):
                    labelled = mask[:, index].nonzero().squeeze(1)
                    if labelled.numel() == 0:
                        continue
                    output = _to_float(_select(outputs[index], labelled))
                    metric.update(output, targets[index].index_select(0, labelled))
        values = np.array([metric.compute() for metric in metrics], dtype=float)
        return values[:, 0], values[:, 1]

    def state_dict(self) -> dict[str, Any]:
        """Return the state needed to continue the run exactly, as tensors and builtins."""
        return {
            "format": _CHECKPOINT_FORMAT,
            "seed": self.config.seed,
            "run_settings": dict(self.run_settings),
            "task_names": [task.name for task in self.tasks],
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "records": [record.to_state() for record in self.records],
            "task_weights": self.task_weights.detach().cpu(),
            "gates": self.gates.tolist(),
            "random_states": _get_random_states(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, random number generators included."""
        self._check_state(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.records = [EpochRecord.from_state(record) for record in state["records"]]
        self.task_weights = state["task_weights"].to(self.device, torch.float32)
        self.gates = np.asarray(state["gates"], dtype=bool)
        _set_random_states(state["random_states"])

    def resume(self, path: Path, state: Mapping[str, Any] | None = None) -> None:
        """Load the checkpoint at ``path``, so that ``fit`` continues after its last epoch.

        ``state`` is the checkpoint already read from ``path`` with :func:`read_checkpoint`,
        which spares a second read; None reads the file.
        """
        path = Path(path)
        if state is None:
            state = read_checkpoint(path)
        try:
            self.load_state_dict(state)
        except UsageError:
            raise
        except (ValueError, KeyError, RuntimeError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            # The scheduler's messages end with a fix of their own; keep only the fault.
            fault = first_line.split(";")[0]
            raise UsageError(
                f"checkpoint {str(path)!r} does not match this run: {fault};"
                " resume with the settings that wrote it, or train without resuming"
            ) from error
        _logger.info("resumed from %s after epoch %d", path, len(self.records))

    def _check_state(self, state: Mapping[str, Any]) -> None:
        check_checkpoint_settings(state, self.config.seed, self.run_settings)
        names = [task.name for task in self.tasks]
        if state["task_names"] != names:
            raise UsageError(
                f"the checkpoint's tasks {state['task_names']} differ from the experiment's"
                f" {names}; resume with the same experiment and options"
            )

    def _save_checkpoint(self) -> None:
        path = self.checkpoint_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".last-", suffix=".pt")
        try:
            # A checkpoint whose write has started is finished before Ctrl-C or SIGTERM acts.
            with deferred_signals():
                with os.fdopen(descriptor, "wb") as file:
                    torch.save(self.state_dict(), file)
                os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)

    def _optimizer_step(
        self, losses: Sequence[Tensor], active_weights: Tensor, active: np.ndarray
    ) -> None:
        total = torch.zeros((), device=self.device)
        for index in np.flatnonzero(active).tolist():
            total = total + active_weights[index] * losses[index]
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    def _check_losses(self, losses: np.ndarray, n_batches: np.ndarray, epoch: int) -> None:
        for task, loss, count in zip(self.tasks, losses, n_batches, strict=True):
            if count == 0:
                raise UsageError(
                    f"task {task.name!r} has no labelled sample in the training split;"
                    " give every task labelled training data or remove the task"
                )
            if not math.isfinite(loss):
                raise DivergedError(task.name, epoch, float(loss))

    def _set_task_weights(self, losses: np.ndarray) -> None:
        weights = static_task_weights(losses, enabled=self.config.static_weights)
        self.task_weights = torch.as_tensor(weights, dtype=torch.float32, device=self.device)
        if self.config.static_weights:
            _logger.info(
                "static task weights: %s",
                ", ".join(
                    f"{task.name}={weight:.3g}"
                    for task, weight in zip(self.tasks, weights, strict=True)
                ),
            )

    def _make_loader(self, dataset: Dataset, *, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self._batch_size,
            shuffle=shuffle,
            generator=self._generator if shuffle else None,
            num_workers=self.config.num_workers,
            pin_memory=self._pin_memory,
        )

    def _progress(self, loader: DataLoader, epoch: int) -> Iterator[Any]:
        return tqdm(
            loader,
            desc=f"epoch {epoch}/{self.config.n_epochs}",
            unit="batch",
            leave=False,
            file=sys.stderr,
            # None lets tqdm hide the bar when stderr is not a terminal, as in a log file.
            disable=None if self.config.show_progress else True,
        )

    def _grad_context(self, update: bool) -> AbstractContextManager[Any]:
        return nullcontext() if update else torch.no_grad()

    def _autocast(self) -> AbstractContextManager[Any]:
        # NOTE: the CUDA paths (bf16 autocast, pinned memory, CUDA random states) have not
        # run on a GPU yet. Compare a short run with float32 before a long one.
        if not self._bf16:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    def _to_device(self, batch: Any) -> tuple[Any, list[Tensor], Tensor]:
        inputs, targets, mask = batch
        non_blocking = self._pin_memory
        inputs = _move(inputs, self.device, non_blocking)
        targets = [target.to(self.device, non_blocking=non_blocking) for target in targets]
        mask = mask.to(self.device, non_blocking=non_blocking).bool()
        return inputs, targets, mask

    def _log_ignored_options(self) -> None:
        if self.config.bf16 and not self._bf16:
            _logger.warning("bf16 autocast applies on CUDA only; training in float32 on CPU")
        if self.config.pin_memory and not self._pin_memory:
            _logger.info("pin_memory applies on CUDA only; not pinning on %s", self.device)

    def _log_record(self, record: EpochRecord) -> None:
        losses = " ".join(
            f"{task.name}={loss:.4g}"
            for task, loss in zip(self.tasks, record.train_losses, strict=True)
        )
        # Epoch 1 trains no task, so it shows "-" in place of its gates.
        gates = "".join(str(int(on)) for on in record.active)
        if record.epoch == 1:
            gates = "-"
        _logger.info(
            "epoch %d/%d: train losses %s; gates %s; val avg error %.2f%%;"
            " test avg error %.2f%%; %.1f s",
            record.epoch,
            self.config.n_epochs,
            losses,
            gates,
            record.val_avg_error,
            record.test_avg_error,
            record.seconds,
        )


def train_experiment(
    experiment: Experiment,
    scheduler_name: str,
    config: TrainConfig,
    *,
    lambdas: Sequence[float] | Mapping[str, float] = (0.2, 0.2, 0.2, 0.2, 0.2),
    beta: float = 0.1,
    count_metric: str = "proportional",
    p: float = 0.5,
    stl_task: str | int | None = None,
    callbacks: Sequence[Callback] = (),
    resume_from: Path | None = None,
) -> tuple[Trainer, TrainResult]:
    """Load ``experiment``, build its model and scheduler, and train.

    Seeds Python, numpy and torch with ``config.seed`` before the data are loaded and the
    model is built. ``lr`` and ``batch_size`` left at None in ``config`` come from
    ``experiment.train_defaults``. With ``resume_from``, training continues after the
    checkpoint's last epoch.
    """
    from dst._scheduler import make_scheduler

    config = resolve_config(config, experiment)
    settings = run_settings(experiment, config)
    settings.update(
        scheduler_settings(
            scheduler_name,
            lambdas=lambdas,
            beta=beta,
            count_metric=count_metric,
            p=p,
            stl_task=stl_task,
        )
    )
    checkpoint = None
    if resume_from is not None:
        # Mismatched settings fail here, before the data are loaded.
        checkpoint = read_checkpoint(resume_from)
        check_checkpoint_settings(checkpoint, config.seed, settings)
    seed_everything(config.seed)
    data = experiment.load(config.seed)
    model = experiment.build_model(data.tasks)
    scheduler = make_scheduler(
        scheduler_name,
        data.tasks,
        lambdas=lambdas,
        beta=beta,
        seed=config.seed,
        count_metric=count_metric,
        p=p,
        stl_task=stl_task,
    )
    trainer = Trainer(data, model, scheduler, config, callbacks)
    trainer.run_settings = settings
    if resume_from is not None:
        trainer.resume(resume_from, checkpoint)
    return trainer, trainer.fit()


def run_settings(experiment: Experiment, config: TrainConfig) -> dict[str, str]:
    """Return the settings that a resumed run must share with its checkpoint, as text.

    ``data_dir`` is left out, because the same data may sit in another folder on the
    machine that resumes.
    """
    settings = {
        f"option {name}": repr(value)
        for name, value in sorted(experiment.options.items())
        if name != "data_dir"
    }
    settings["lr"] = repr(config.lr)
    settings["batch_size"] = repr(config.batch_size)
    return settings


def epochs_table(records: Sequence[EpochRecord], task_names: Sequence[str]) -> pd.DataFrame:
    """Return one row of :meth:`EpochRecord.as_dict` per epoch, with integer flags and counts.

    ``as_dict`` gives floats, as MLflow metrics need. The table turns the epoch, ``updated``
    and the ``active/`` and ``gate/`` columns back into integers for CSV files.
    """
    import pandas as pd

    table = pd.DataFrame([record.as_dict(task_names) for record in records])
    integers = [
        column
        for column in table.columns
        if column in ("epoch", "updated") or column.startswith(("active/", "gate/"))
    ]
    table[integers] = table[integers].astype(int)
    return table


def scheduler_settings(
    name: str,
    *,
    lambdas: Sequence[float] | Mapping[str, float],
    beta: float,
    count_metric: str,
    p: float,
    stl_task: str | int | None,
) -> dict[str, str]:
    """Return the scheduler settings that a resumed run must share with its checkpoint."""
    from dst._scheduler import check_lambdas

    settings = {"scheduler": repr(name)}
    if name == "dst":
        settings["lambdas"] = repr(check_lambdas(lambdas))
        settings["beta"] = repr(float(beta))
        settings["count_metric"] = repr(count_metric)
    elif name == "random":
        settings["p"] = repr(float(p))
    elif name == "stl":
        settings["stl_task"] = repr(stl_task)
    return settings


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load the checkpoint at ``path`` onto the CPU.

    Raises:
        UsageError: The file is missing or is not a checkpoint that torch can read.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} not found; train without resuming first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        raise UsageError(
            f"checkpoint {str(path)!r} cannot be read ({type(error).__name__});"
            " delete it and train without resuming"
        ) from error


def check_checkpoint_settings(
    state: Mapping[str, Any], seed: int, settings: Mapping[str, str]
) -> None:
    """Raise UsageError unless the checkpoint ``state`` was written by a run like this one.

    ``settings`` are compared by name with the checkpoint's ``run_settings``. A name that
    either side lacks is not compared, so checkpoints of older versions still resume.
    """
    if state.get("format") != _CHECKPOINT_FORMAT:
        raise UsageError(
            f"checkpoint format {state.get('format')!r} is not supported, expected"
            f" {_CHECKPOINT_FORMAT}; start the run again without resuming"
        )
    if state.get("seed") != seed:
        raise UsageError(
            f"the checkpoint was written with seed {state.get('seed')}, not {seed};"
            f" resume with --seed {state.get('seed')}"
        )
    saved = state.get("run_settings") or {}
    for name, value in settings.items():
        if name in saved and saved[name] != value:
            raise UsageError(
                f"the checkpoint was written with {name} = {_setting_text(saved[name])}, not"
                f" {_setting_text(value)}; resume with the settings that wrote it, or train"
                " without resuming"
            )


def _setting_text(text: str) -> str:
    # An option left at None takes a default that depends on other options (a preset).
    return "the default" if text == "None" else text


def resolve_config(config: TrainConfig, experiment: Experiment) -> TrainConfig:
    """Return a copy of ``config`` with ``lr`` and ``batch_size`` filled from the experiment."""
    defaults = experiment.train_defaults
    lr = config.lr if config.lr is not None else float(defaults["lr"])
    batch_size = config.batch_size if config.batch_size is not None else defaults["batch_size"]
    return replace(config, lr=lr, batch_size=int(batch_size))


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_config(config: TrainConfig) -> tuple[float, int]:
    """Check ``config`` and return its learning rate and batch size."""
    if config.lr is None or config.batch_size is None:
        raise UsageError(
            "TrainConfig.lr and batch_size must be set for a Trainer; use train_experiment"
            " or resolve_config to take them from the experiment's train_defaults"
        )
    checks = [
        ("n_epochs", config.n_epochs, config.n_epochs >= 1, "at least 1"),
        ("lr", config.lr, config.lr > 0, "positive"),
        ("batch_size", config.batch_size, config.batch_size >= 1, "at least 1"),
        ("num_workers", config.num_workers, config.num_workers >= 0, "0 or more"),
    ]
    for name, value, valid, expected in checks:
        if not valid:
            raise UsageError(f"{name} must be {expected}, got {value}")
    return config.lr, config.batch_size


def _zero_unlabelled(target: Tensor, labelled: Tensor) -> Tensor:
    """Replace the targets of unlabelled samples by zeros.

    So a placeholder such as NaN or class -1 reaches neither a task's loss nor its gradient.
    """
    shape = (labelled.shape[0],) + (1,) * (target.dim() - 1)
    return torch.where(labelled.view(shape), target, torch.zeros_like(target))


def _move(value: Any, device: torch.device, non_blocking: bool) -> Any:
    """Move a tensor, or the tensors in a tuple, list or dict, to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return {key: _move(item, device, non_blocking) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_move(item, device, non_blocking) for item in value)
    return value


def _select(value: Any, index: Tensor) -> Any:
    """Select the samples at ``index`` along the first dimension of every tensor in ``value``."""
    if isinstance(value, Tensor):
        return value.index_select(0, index)
    if isinstance(value, Mapping):
        return {key: _select(item, index) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_select(item, index) for item in value)
    return value


def _to_float(value: Any) -> Any:
    """Cast the floating-point tensors in ``value`` to float32 (outputs of bf16 autocast)."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {key: _to_float(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float(item) for item in value)
    return value


def _get_random_states() -> dict[str, Any]:
    """Return the states of every random number generator as tensors and builtins."""
    numpy_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    kind, keys, position, has_gauss, cached_gaussian = numpy_state
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "python": random.getstate(),
    }


def _set_random_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    keys_array = np.asarray(keys, dtype=np.uint32)
    np.random.set_state((kind, keys_array, position, has_gauss, cached_gaussian))
    version, internal_state, gauss_next = states["python"]
    random.setstate((version, tuple(internal_state), gauss_next))
