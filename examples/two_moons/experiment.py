"""Two moons: a two-task experiment written against the public ``dst`` interface only.

Each sample is a point of one of two interleaving half circles ("moons") with Gaussian
noise. The ``moon`` task classifies which half circle the point was drawn from (binary,
BCE). The ``angle`` task regresses where along its half circle the point lies, as a
fraction of the half turn (regression, MSE). Every training point is labelled for ``moon``
and only ``labelled_fraction`` of them for ``angle``, so the two tasks have different
labelled counts. The ``angle`` head is one layer deeper, so their depths differ too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from dst import (
    Experiment,
    ExperimentData,
    Metric,
    MultiTaskModel,
    Task,
    UsageError,
    split_validation,
)

_logger = logging.getLogger(__name__)

TEST_FRACTION = 0.3


class MoonsDataset(Dataset):
    """Points with their two targets and label mask, as items ``(inputs, targets, mask)``."""

    def __init__(self, points: Tensor, moon: Tensor, angle: Tensor, mask: Tensor) -> None:
        self.points, self.moon, self.angle, self.mask = points, moon, angle, mask

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        return self.points[index], (self.moon[index], self.angle[index]), self.mask[index]


def moon_loss(output: Tensor, target: Tensor) -> Tensor:
    """Compute the per-sample binary cross-entropy of logits ``(batch, 1)``."""
    return F.binary_cross_entropy_with_logits(output[:, 0], target, reduction="none")


def angle_loss(output: Tensor, target: Tensor) -> Tensor:
    """Compute the per-sample squared error of the predicted angle fraction."""
    return (output[:, 0] - target) ** 2


class MoonAccuracy(Metric):
    """Accuracy in percent of the moon logits. The error is 100 minus the accuracy."""

    name = "accuracy"

    def __init__(self) -> None:
        self.correct: Tensor | None = None
        self.n_samples = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        correct = ((output[:, 0] > 0) == (target > 0.5)).sum()
        self.correct = correct if self.correct is None else self.correct + correct
        self.n_samples += target.shape[0]

    def compute(self) -> tuple[float, float]:
        if self.correct is None or self.n_samples == 0:
            return math.nan, math.nan
        accuracy = 100.0 * float(self.correct) / self.n_samples
        return accuracy, 100.0 - accuracy


class AngleError(Metric):
    """Mean absolute error of the angle fraction. The error is the same value in percent."""

    name = "mean_absolute_error"

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.n_samples = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        total = (output[:, 0] - target).abs().sum()
        self.total = total if self.total is None else self.total + total
        self.n_samples += target.shape[0]

    def compute(self) -> tuple[float, float]:
        if self.total is None or self.n_samples == 0:
            return math.nan, math.nan
        error = float(self.total) / self.n_samples
        return error, 100.0 * error


class TwoMoonsModel(MultiTaskModel):
    """A shared two-layer MLP, a linear ``moon`` head and a two-layer ``angle`` head."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        moon_head = nn.Linear(hidden, 1)
        angle_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.heads = nn.ModuleList([moon_head, angle_head])

    def shared(self, inputs: Tensor) -> Tensor:
        return self.trunk(inputs)


class TwoMoonsExperiment(Experiment):
    """Two tasks on generated two-moons points.

    Options:
        n_samples: Number of generated points, 70 % for training and 30 % for test.
        noise: Standard deviation of the Gaussian noise added to each coordinate.
        labelled_fraction: Fraction of the training points labelled for ``angle``.
        validation_fraction: Fraction of the training points held out for validation.
        hidden: Width of the hidden layers.
        data_seed: Seed of the generated points, so the test split is the same in every run.
    """

    name: ClassVar[str] = "two-moons"
    defaults: ClassVar[dict[str, Any]] = {
        "n_samples": 1000,
        "noise": 0.1,
        "labelled_fraction": 0.5,
        "validation_fraction": 0.2,
        "hidden": 32,
        "data_seed": 0,
    }
    train_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-2, "batch_size": 64}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not 0 < self.options["labelled_fraction"] <= 1:
            raise UsageError(
                f"invalid option labelled_fraction={self.options['labelled_fraction']!r};"
                " use a fraction in (0, 1]"
            )
        if int(self.options["n_samples"]) < 20:
            raise UsageError(
                f"invalid option n_samples={self.options['n_samples']!r}; use 20 or more"
            )

    def load(self, seed: int) -> ExperimentData:
        points, moon, angle = make_moons(
            int(self.options["n_samples"]),
            float(self.options["noise"]),
            int(self.options["data_seed"]),
        )
        n_train = round((1 - TEST_FRACTION) * len(points))

        # The run seed draws which training points carry an angle label. The stream [seed, 1]
        # is independent of the points, even when seed equals data_seed.
        draws = np.random.default_rng([seed, 1]).random(n_train)
        labelled = torch.from_numpy(draws < self.options["labelled_fraction"])
        train_mask = torch.stack([torch.ones(n_train, dtype=torch.bool), labelled], dim=1)
        pool = MoonsDataset(points[:n_train], moon[:n_train], angle[:n_train], train_mask)
        test_mask = torch.ones(len(points) - n_train, 2, dtype=torch.bool)
        test = MoonsDataset(points[n_train:], moon[n_train:], angle[n_train:], test_mask)

        train, validation = split_validation(pool, self.options["validation_fraction"], seed)
        n_labelled = train_mask[train.indices].sum(dim=0).tolist()
        tasks = [
            Task("moon", "binary", moon_loss, MoonAccuracy, depth=3, n_labelled=n_labelled[0]),
            Task("angle", "regression", angle_loss, AngleError, depth=4, n_labelled=n_labelled[1]),
        ]
        _logger.info(
            "two moons: %d train, %d validation, %d test points",
            len(train),
            len(validation),
            len(test),
        )
        return ExperimentData(tasks=tasks, train=train, validation=validation, test=test)

    def build_model(self, tasks: Sequence[Task]) -> MultiTaskModel:
        return TwoMoonsModel(int(self.options["hidden"]))


def make_moons(n_samples: int, noise: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Generate points on two interleaving half circles.

    Returns:
        ``(points, moon, angle)``: coordinates ``(n, 2)``, the half circle of each point
        (0 or 1) and its position along it as a fraction of the half turn, in [0, 1].
    """
    generator = np.random.default_rng([seed, 0])
    moon = torch.from_numpy(generator.random(n_samples) < 0.5).float()
    angle = torch.from_numpy(generator.random(n_samples)).float()
    turn = math.pi * angle
    # The lower moon is the upper one turned over and moved right by 1 and down by 0.5.
    x = torch.where(moon == 0, turn.cos(), 1 - turn.cos())
    y = torch.where(moon == 0, turn.sin(), 0.5 - turn.sin())
    points = torch.stack([x, y], dim=1)
    points += noise * torch.from_numpy(generator.standard_normal(points.shape)).float()
    return points, moon, angle
