"""The experiment interface: tasks, data splits and a model with one head per task.

The built-in experiments in the top-level ``experiments`` package implement exactly this
interface, and so does any experiment a study loads by import path (``package.module:Name``).

Data contract. Every split is a ``torch.utils.data.Dataset`` whose items are
``(inputs, targets, mask)``:

- ``inputs``: a tensor, or a tuple, list or dict of tensors (a Siamese pair, say);
- ``targets``: a tuple with one tensor per task, in task order. A sample without a label for
  task ``t`` still carries a placeholder of the right shape and dtype, so batches collate;
- ``mask``: a bool tensor of shape ``(n_tasks,)``, true where the sample is labelled for the
  task. The trainer averages a task's loss over the labelled samples of the batch only.

Model contract. ``MultiTaskModel.shared(inputs)`` returns the features of the shared part (any
object), and ``model.heads[t](features)`` returns task ``t``'s output. The trainer runs the
head of a dropped task under ``torch.no_grad()``, so it builds no graph for it.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from dst._errors import UsageError

LossFn = Callable[[Tensor, Tensor], Tensor]
"""Per-sample loss: ``loss(output, target)`` returns a tensor of shape ``(batch,)``."""


class Metric(ABC):
    """Accumulator of one task's evaluation metric over a split.

    ``update`` receives only the labelled samples of a batch. It should keep running sums
    on the device and leave reading them to ``compute``, so that evaluation does not sync
    with the host once per batch.
    """

    name: ClassVar[str] = "metric"

    @abstractmethod
    def update(self, output: Tensor, target: Tensor) -> None:
        """Add one batch of labelled outputs and targets."""

    @abstractmethod
    def compute(self) -> tuple[float, float]:
        """Return ``(value, error)``: the metric and the task's error in percent.

        The error is what the average error averages: 100 - accuracy for classification,
        the normalised error for regression, 100 - 100 * IoU for segmentation, the equal
        error rate in percent for verification. A split with no labelled sample returns
        ``(nan, nan)``.
        """


@dataclass(frozen=True)
class Task:
    """One task of a multi-task experiment.

    Attributes:
        name: Any string, a folder name included. Keys and file names derived from it are
            sanitised where they are used.
        kind: What the task predicts, such as ``"classification"``, ``"binary"``,
            ``"regression"``, ``"denoising"``, ``"segmentation"`` or ``"verification"``.
        loss: Per-sample loss, see :data:`LossFn`.
        metric: Factory of a fresh :class:`Metric` for one evaluation pass.
        depth: Number of layers from the input to the task's output, the DST depth ``d_t``.
        n_labelled: Number of labelled training samples, the DST count ``c_t``.
    """

    name: str
    kind: str
    loss: LossFn
    metric: Callable[[], Metric]
    depth: int
    n_labelled: int


@dataclass
class ExperimentData:
    """The tasks of an experiment and its train, validation and test splits."""

    tasks: list[Task]
    train: Dataset
    validation: Dataset
    test: Dataset


class MultiTaskModel(nn.Module):
    """A shared part and one head per task, ``heads[t]`` for task ``t`` in task order."""

    heads: nn.ModuleList

    def shared(self, inputs: Any) -> Any:
        """Return the features that every head reads."""
        raise NotImplementedError

    def forward(self, inputs: Any) -> list[Any]:
        features = self.shared(inputs)
        return [head(features) for head in self.heads]


class Experiment(ABC):
    """A data set, its tasks and a model, configured by keyword options.

    Subclasses declare their options with defaults in ``defaults``; unknown options are
    rejected. ``options`` contains the resolved values, which the tracking logs as params.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}
    train_defaults: ClassVar[Mapping[str, Any]] = {"lr": 1e-3, "batch_size": 32}
    """Learning rate and batch size used when the command line or study gives none."""

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            name = self.name or type(self).__name__
            raise UsageError(
                f"unknown option {unknown[0]!r} for experiment {name!r}; its options are: {known}"
            )
        self.options: dict[str, Any] = {**self.defaults, **options}

    @abstractmethod
    def load(self, seed: int) -> ExperimentData:
        """Load or generate the data; ``seed`` fixes the validation split and label draws."""

    @abstractmethod
    def build_model(self, tasks: Sequence[Task]) -> MultiTaskModel:
        """Return a new model with one head per task, in the order of ``tasks``."""

    @classmethod
    def demo(cls, folder: Path) -> dict[str, Any]:
        """Write a small generated data set in the real on-disk format under ``folder``.

        Returns the options (``data_dir`` and the like) that make the experiment read it.
        ``dst train --demo`` and the tests use this to run without licensed data.
        """
        raise UsageError(
            f"experiment {cls.name or cls.__name__!r} has no demo data; give --data-dir instead"
        )


def split_validation(dataset: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Split ``dataset`` into ``(train, validation)`` by a permutation fixed by ``seed``."""
    n_samples = len(dataset)  # type: ignore[arg-type]
    n_validation = max(1, round(fraction * n_samples))
    if n_validation >= n_samples:
        raise UsageError(
            f"validation fraction {fraction} leaves no training sample out of {n_samples};"
            " use a smaller fraction or more data"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_samples, generator=generator).tolist()
    return Subset(dataset, order[n_validation:]), Subset(dataset, order[:n_validation])


BUILTIN_EXPERIMENTS: dict[str, str] = {
    "shapes": "experiments.shapes:ShapesExperiment",
    "omniglot": "experiments.omniglot:OmniglotExperiment",
    "face": "experiments.face:FaceExperiment",
    "fingerprint": "experiments.fingerprint:FingerprintExperiment",
}


def resolve_experiment(reference: str) -> type[Experiment]:
    """Return the experiment class named by a built-in name or a ``package.module:Name`` path."""
    path = BUILTIN_EXPERIMENTS.get(reference, reference)
    if ":" not in path:
        names = ", ".join(sorted(BUILTIN_EXPERIMENTS))
        raise UsageError(
            f"unknown experiment {reference!r}; use one of {names} or an import path"
            " 'package.module:Name'"
        )
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(
            f"cannot import experiment module {module_name!r} of {reference!r}: {error};"
            " install the package or add its folder to PYTHONPATH on every worker"
        ) from error
    try:
        obj = getattr(module, attribute)
    except AttributeError:
        raise UsageError(
            f"module {module_name!r} has no attribute {attribute!r} (from {reference!r});"
            " check the name after the colon"
        ) from None
    if not (inspect.isclass(obj) and issubclass(obj, Experiment)):
        raise UsageError(
            f"{reference!r} is not a subclass of dst.Experiment; define a class that"
            " implements load() and build_model()"
        )
    return obj


def create_experiment(reference: str, options: Mapping[str, Any] | None = None) -> Experiment:
    """Instantiate the experiment named by ``reference`` with ``options``."""
    experiment_class = resolve_experiment(reference)
    try:
        return experiment_class(**dict(options or {}))
    except TypeError as error:
        raise UsageError(f"invalid options for experiment {reference!r}: {error}") from error
