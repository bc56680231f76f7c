"""Per-sample losses and evaluation metrics shared by the experiments.

Every loss maps ``(output, target)`` to a tensor of shape ``(batch,)`` and stays finite for
the placeholder targets that unlabelled samples carry (class 0, zeros, no present point).

Every metric keeps running sums on the device and reads them once in ``compute()``. That
returns ``(value, error)``, the metric in its own unit and the task's error in percent, or
``(nan, nan)`` when no labelled sample was seen.

Point layout. A regression target with a presence mask is ``(batch, n_points, point_dims + 1)``:
the coordinates of each point followed by 1 where the point is present (annotated, inside the
image) and 0 where it is not. The matching output is ``(batch, n_points * point_dims)`` or
``(batch, n_points, point_dims)``.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dst._errors import UsageError
from dst._experiment import LossFn, Metric

_logger = logging.getLogger(__name__)

__all__ = [
    "Accuracy",
    "BinaryAccuracy",
    "EqualErrorRate",
    "IoU",
    "NormalisedError",
    "PixelError",
    "binary_cross_entropy",
    "contrastive",
    "contrastive_loss",
    "cross_entropy",
    "masked_mse",
    "mse",
    "pixel_binary_cross_entropy",
    "pixel_mse",
    "pose_mse",
]


# Losses


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Compute the cross-entropy of logits ``(batch, n_classes)`` and class indices."""
    return F.cross_entropy(output, target.long(), reduction="none")


def binary_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Compute the binary cross-entropy of logits ``(batch,)`` or ``(batch, 1)`` and 0/1 labels."""
    n_samples = output.shape[0]
    return F.binary_cross_entropy_with_logits(
        output.reshape(n_samples), target.reshape(n_samples).to(output.dtype), reduction="none"
    )


def mse(output: Tensor, target: Tensor) -> Tensor:
    """Compute the squared error averaged over all target values of each sample."""
    squared_error = (output.reshape(target.shape) - target.to(output.dtype)) ** 2
    return squared_error.reshape(squared_error.shape[0], -1).mean(dim=1)


def pose_mse(output: Tensor, target: Tensor) -> Tensor:
    """Compute the pose loss: squared error summed over the angles and divided by their number.

    For the three angles (yaw, pitch, roll) of a face this is the "MSE / 3" of the face
    experiment of Malhotra et al. (Dropped Scheduled Task, TMLR 2022). It equals :func:`mse`.
    """
    return mse(output, target)


def masked_mse(output: Tensor, target: Tensor) -> Tensor:
    """Compute the squared error over the present points, normalised by their number.

    ``target`` has the point layout ``(batch, n_points, point_dims + 1)`` of this module. The
    loss of a sample is the sum of squared coordinate errors over its present points divided
    by ``n_present * point_dims``, and 0 for a sample with no present point.
    """
    coordinates, present = _split_points(target)
    predicted = output.reshape(coordinates.shape)
    squared_error = ((predicted - coordinates.to(predicted.dtype)) ** 2).sum(dim=2)
    present = present.to(predicted.dtype)
    n_values = present.sum(dim=1) * coordinates.shape[2]
    return (squared_error * present).sum(dim=1) / n_values.clamp(min=1)


def pixel_mse(output: Tensor, target: Tensor) -> Tensor:
    """Compute the squared error averaged over the pixels and channels of each image."""
    return mse(output, target)


def pixel_binary_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Compute the binary cross-entropy of pixel logits and 0/1 masks, averaged per image.

    ``output`` and ``target`` hold the same number of values per sample, for instance
    ``(batch, 1, height, width)`` logits and a ``(batch, height, width)`` mask.
    """
    loss = F.binary_cross_entropy_with_logits(
        output.reshape(target.shape), target.to(output.dtype), reduction="none"
    )
    return loss.reshape(loss.shape[0], -1).mean(dim=1)


def contrastive(output: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """Compute the contrastive loss of pair distances ``(batch,)`` and match labels.

    The loss is ``y * d**2 + (1 - y) * max(0, margin - d)**2`` where ``d`` is the distance
    of the pair and ``y`` is 1 for a matching pair and 0 otherwise.
    """
    distance = output.reshape(output.shape[0])
    match = target.reshape(output.shape[0]).to(distance.dtype)
    mismatch_term = torch.clamp(margin - distance, min=0) ** 2
    return match * distance**2 + (1 - match) * mismatch_term


def contrastive_loss(margin: float) -> LossFn:
    """Return the :func:`contrastive` loss with the given margin."""
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin > 0):
        raise UsageError(
            f"invalid contrastive margin {margin!r}; use a positive number such as 1.0"
        )
    return functools.partial(contrastive, margin=float(margin))


def _split_points(target: Tensor) -> tuple[Tensor, Tensor]:
    """Split a point-layout target into coordinates and a bool presence mask."""
    if target.dim() != 3 or target.shape[2] < 2:
        raise ValueError(
            "a masked point target must have shape (batch, n_points, point_dims + 1),"
            f" got {tuple(target.shape)}"
        )
    return target[:, :, :-1], target[:, :, -1] > 0.5


# Metrics


class _Counter(Metric):
    """A metric that keeps device sums next to a host-side count of samples."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._n_samples = 0

    def _add(self, name: str, value: Tensor) -> None:
        value = value.detach()
        total = self._sums.get(name)
        self._sums[name] = value.to(torch.float64) if total is None else total + value

    def _read(self) -> dict[str, float] | None:
        """Return the sums as floats, read from the device at once, or None when empty."""
        if self._n_samples == 0 or not self._sums:
            return None
        values = torch.stack(list(self._sums.values())).cpu().tolist()
        return dict(zip(self._sums, values, strict=True))


class Accuracy(_Counter):
    """Multiclass accuracy in percent. The error is 100 minus the accuracy.

    ``update`` takes logits ``(batch, n_classes)`` and class indices ``(batch,)``.
    """

    name = "accuracy"

    def update(self, output: Tensor, target: Tensor) -> None:
        predicted = output.argmax(dim=1)
        self._add("correct", (predicted == target.reshape(predicted.shape)).sum())
        self._n_samples += predicted.shape[0]

    def compute(self) -> tuple[float, float]:
        sums = self._read()
        if sums is None:
            return math.nan, math.nan
        accuracy = 100.0 * sums["correct"] / self._n_samples
        return accuracy, 100.0 - accuracy


class BinaryAccuracy(Accuracy):
    """Binary accuracy in percent of logits ``(batch,)`` or ``(batch, 1)`` against 0/1 labels.

    A logit above 0 predicts 1. The error is 100 minus the accuracy.
    """

    name = "binary_accuracy"

    def update(self, output: Tensor, target: Tensor) -> None:
        n_samples = output.shape[0]
        predicted = output.reshape(n_samples) > 0
        labels = target.reshape(n_samples) > 0.5
        self._add("correct", (predicted == labels).sum())
        self._n_samples += n_samples


class NormalisedError(_Counter):
    """Mean point error of a regression, normalised by a scale, in percent.

    The outputs and targets are grouped into points of ``point_dims`` coordinates. The value
    is the Euclidean distance between predicted and true point, averaged over all points of
    the split, in target units; the error is ``100 * value / scale``. With ``point_dims=1``
    this is the mean absolute error. With ``masked=True`` the target has the point layout of
    this module and only present points count; a split with no present point returns
    ``(nan, nan)``.

    Args:
        scale: The length that maps to 100 % error, such as the image size for pixel
            coordinates or the range of an angle.
        point_dims: Number of coordinates per point.
        masked: Whether the target carries a presence flag per point.
    """

    name = "normalised_error"

    def __init__(self, scale: float, point_dims: int = 1, masked: bool = False) -> None:
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise UsageError(
                f"invalid normalised error scale {scale!r}; use a positive length in target units"
            )
        if point_dims < 1:
            raise UsageError(f"invalid point_dims {point_dims!r}; use 1 or more coordinates")
        self.scale = float(scale)
        self.point_dims = point_dims
        self.masked = masked

    def update(self, output: Tensor, target: Tensor) -> None:
        n_samples = output.shape[0]
        if self.masked:
            coordinates, present = _split_points(target)
        else:
            coordinates = target.reshape(n_samples, -1, self.point_dims)
            present = torch.ones(coordinates.shape[:2], dtype=torch.bool, device=target.device)
        predicted = output.reshape(coordinates.shape)
        distance = torch.linalg.vector_norm(predicted - coordinates.to(predicted.dtype), dim=2)
        self._add("distance", (distance * present).sum())
        self._add("n_points", present.sum())
        self._n_samples += n_samples

    def compute(self) -> tuple[float, float]:
        sums = self._read()
        if sums is None or sums["n_points"] == 0:
            return math.nan, math.nan
        mean_distance = sums["distance"] / sums["n_points"]
        return mean_distance, 100.0 * mean_distance / self.scale


class PixelError(_Counter):
    """Mean absolute pixel error of a dense output, in percent of the intensity range.

    The value is the absolute difference between output and target averaged over every
    pixel and channel of the split, in intensity units. The error is
    ``100 * value / intensity_range``, and images scaled to [0, 1] have a range of 1.

    Args:
        intensity_range: The difference between the largest and smallest intensity.
    """

    name = "pixel_error"

    def __init__(self, intensity_range: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(intensity_range) and intensity_range > 0):
            raise UsageError(
                f"invalid intensity range {intensity_range!r}; use a positive number such as 1.0"
            )
        self.intensity_range = float(intensity_range)

    def update(self, output: Tensor, target: Tensor) -> None:
        difference = output.reshape(target.shape) - target.to(output.dtype)
        self._add("absolute_error", difference.abs().sum())
        self._add("n_values", torch.tensor(difference.numel(), device=difference.device))
        self._n_samples += output.shape[0]

    def compute(self) -> tuple[float, float]:
        sums = self._read()
        if sums is None or sums["n_values"] == 0:
            return math.nan, math.nan
        mean_error = sums["absolute_error"] / sums["n_values"]
        return mean_error, 100.0 * mean_error / self.intensity_range


class IoU(_Counter):
    """Foreground intersection over union of a segmentation, pooled over the split.

    ``update`` takes pixel logits and 0/1 masks with the same number of values per sample; a
    logit above 0 predicts foreground. The value is the IoU in [0, 1], computed from the
    intersection and union summed over every image, and the error is ``100 - 100 * IoU``.
    A split whose predictions and masks are all background has an IoU of 1.
    """

    name = "iou"

    def update(self, output: Tensor, target: Tensor) -> None:
        predicted = output.reshape(target.shape) > 0
        foreground = target > 0.5
        self._add("intersection", (predicted & foreground).sum())
        self._add("union", (predicted | foreground).sum())
        self._n_samples += output.shape[0]

    def compute(self) -> tuple[float, float]:
        sums = self._read()
        if sums is None:
            return math.nan, math.nan
        iou = 1.0 if sums["union"] == 0 else sums["intersection"] / sums["union"]
        return iou, 100.0 - 100.0 * iou


class EqualErrorRate(Metric):
    """Equal error rate of a verification task, in percent, from pair distances.

    ``update`` takes distances ``(batch,)`` and labels that are 1 for a matching pair. A pair
    is accepted as a match when its distance is at most the threshold. Sweeping the
    threshold over every distance seen gives the false accept rate (non-matches accepted)
    and the false reject rate (matches rejected). The EER is where the two are equal,
    interpolated linearly between the two thresholds around the crossing. The metric keeps
    every distance until ``compute``. Both value and error are the EER in percent, and a
    split without both matching and non-matching pairs returns ``(nan, nan)``.
    """

    name = "equal_error_rate"

    def __init__(self) -> None:
        self._distances: list[Tensor] = []
        self._labels: list[Tensor] = []

    def update(self, output: Tensor, target: Tensor) -> None:
        n_samples = output.shape[0]
        self._distances.append(output.detach().reshape(n_samples))
        self._labels.append(target.detach().reshape(n_samples) > 0.5)

    def compute(self) -> tuple[float, float]:
        if not self._distances:
            return math.nan, math.nan
        distances = torch.cat(self._distances).to(torch.float64).cpu()
        labels = torch.cat(self._labels).cpu()
        eer = _equal_error_rate(distances, labels)
        return eer, eer


def _equal_error_rate(distances: Tensor, match: Tensor) -> float:
    """Return the EER in percent of distances and bool match labels, nan without both kinds."""
    n_match = int(match.sum())
    n_mismatch = match.numel() - n_match
    if n_match == 0 or n_mismatch == 0:
        return math.nan

    # Rates at every distinct distance used as the threshold, after a threshold below all.
    thresholds, inverse = torch.unique(distances, sorted=True, return_inverse=True)
    match_counts = torch.zeros(len(thresholds), dtype=torch.float64)
    match_counts.index_add_(0, inverse, match.to(torch.float64))
    mismatch_counts = torch.zeros(len(thresholds), dtype=torch.float64)
    mismatch_counts.index_add_(0, inverse, (~match).to(torch.float64))
    zero = torch.zeros(1, dtype=torch.float64)
    false_accept = torch.cat([zero, mismatch_counts.cumsum(0) / n_mismatch])
    false_reject = torch.cat([zero + 1, 1 - match_counts.cumsum(0) / n_match])

    # The difference rises from -1 to +1, so interpolate where it first reaches 0.
    difference = false_accept - false_reject
    after = int(torch.nonzero(difference >= 0)[0])
    before = after - 1
    fraction = -difference[before] / (difference[after] - difference[before])
    eer = false_accept[before] + fraction * (false_accept[after] - false_accept[before])
    return 100.0 * float(eer)
