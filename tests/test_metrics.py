"""Losses and metrics of dst._metrics, checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dst import UsageError
from dst._metrics import (
    Accuracy,
    BinaryAccuracy,
    EqualErrorRate,
    IoU,
    NormalisedError,
    PixelError,
    binary_cross_entropy,
    contrastive,
    contrastive_loss,
    cross_entropy,
    masked_mse,
    mse,
    pixel_binary_cross_entropy,
    pixel_mse,
    pose_mse,
)

ALL_METRICS = [
    Accuracy,
    BinaryAccuracy,
    EqualErrorRate,
    IoU,
    lambda: NormalisedError(scale=1.0),
    PixelError,
]


def test_cross_entropy_per_sample() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    loss = cross_entropy(logits, torch.tensor([0, 1]))
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(math.log(2))
    assert loss[1].item() == pytest.approx(2 + math.log(1 + math.exp(-2)))


def test_binary_cross_entropy_accepts_column_logits() -> None:
    logits = torch.tensor([[0.0], [1.0]])
    loss = binary_cross_entropy(logits, torch.tensor([1.0, 0.0]))
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(math.log(2))
    assert loss[1].item() == pytest.approx(math.log(1 + math.e))


def test_mse_averages_over_values_of_sample() -> None:
    output = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert mse(output, target).tolist() == pytest.approx([13 / 3, 1.0])


def test_pose_mse_divides_by_three_angles() -> None:
    output = torch.tensor([[0.3, 0.0, -0.3]])
    target = torch.zeros(1, 3)
    assert pose_mse(output, target).item() == pytest.approx((0.09 + 0.09) / 3)


def test_masked_mse_counts_present_points_only() -> None:
    # Sample 0: point 0 present with error (1, 2), point 1 absent with a large error.
    # Sample 1: both present, errors (1, 1) and (0, 0).
    target = torch.tensor(
        [
            [[1.0, 2.0, 1.0], [9.0, 9.0, 0.0]],
            [[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]],
        ]
    )
    output = torch.zeros(2, 4)
    loss = masked_mse(output, target)
    assert loss[0].item() == pytest.approx((1 + 4) / 2)
    assert loss[1].item() == pytest.approx((1 + 1) / 4)


def test_masked_mse_is_zero_without_present_points() -> None:
    target = torch.zeros(3, 4, 3)
    output = torch.full((3, 4, 2), 5.0, requires_grad=True)
    loss = masked_mse(output, target)
    assert loss.tolist() == [0.0, 0.0, 0.0]
    loss.sum().backward()
    assert torch.isfinite(output.grad).all()


def test_masked_mse_rejects_flat_target() -> None:
    with pytest.raises(ValueError, match="n_points"):
        masked_mse(torch.zeros(2, 4), torch.zeros(2, 4))


def test_pixel_mse_averages_over_pixels() -> None:
    output = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    assert pixel_mse(output, target).tolist() == pytest.approx([0.5, 1.0])


def test_pixel_binary_cross_entropy_averages_per_image() -> None:
    output = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    loss = pixel_binary_cross_entropy(output, target)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(math.log(2))


def test_contrastive_pulls_matches_and_pushes_mismatches() -> None:
    distance = torch.tensor([0.5, 0.5, 3.0])
    target = torch.tensor([1.0, 0.0, 0.0])
    loss = contrastive_loss(2.0)(distance, target)
    assert loss.tolist() == pytest.approx([0.25, 2.25, 0.0])
    assert contrastive(distance, target).tolist() == pytest.approx([0.25, 0.25, 0.0])


@pytest.mark.parametrize("margin", [0, -1.0, math.nan, "1"])
def test_contrastive_loss_rejects_invalid_margin(margin: object) -> None:
    with pytest.raises(UsageError, match="margin"):
        contrastive_loss(margin)  # type: ignore[arg-type]


def test_losses_finite_for_placeholder_targets() -> None:
    cases = [
        (cross_entropy, torch.randn(4, 5), torch.zeros(4, dtype=torch.long)),
        (binary_cross_entropy, torch.randn(4, 1), torch.zeros(4)),
        (mse, torch.randn(4, 3), torch.zeros(4, 3)),
        (masked_mse, torch.randn(4, 6), torch.zeros(4, 3, 3)),
        (pixel_mse, torch.randn(4, 1, 4, 4), torch.zeros(4, 1, 4, 4)),
        (pixel_binary_cross_entropy, torch.randn(4, 1, 4, 4), torch.zeros(4, 1, 4, 4)),
        (contrastive, torch.rand(4), torch.zeros(4)),
    ]
    for loss_fn, output, target in cases:
        loss = loss_fn(output, target)
        assert loss.shape == (4,), loss_fn.__name__
        assert torch.isfinite(loss).all(), loss_fn.__name__


@pytest.mark.parametrize("metric_factory", ALL_METRICS)
def test_metric_without_samples_is_nan(metric_factory) -> None:
    value, error = metric_factory().compute()
    assert math.isnan(value)
    assert math.isnan(error)


def test_accuracy_over_batches() -> None:
    metric = Accuracy()
    metric.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 1]))
    metric.update(torch.tensor([[0.0, 3.0, 1.0], [0.0, 1.0, 0.0]]), torch.tensor([1, 1]))
    metric.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    value, error = metric.compute()
    assert value == pytest.approx(75.0)
    assert error == pytest.approx(25.0)


def test_binary_accuracy_thresholds_logits_at_zero() -> None:
    metric = BinaryAccuracy()
    metric.update(torch.tensor([[1.5], [-0.2], [0.3], [-3.0]]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    value, error = metric.compute()
    assert value == pytest.approx(50.0)
    assert error == pytest.approx(50.0)


def test_normalised_error_of_scalars_is_mean_absolute_error() -> None:
    metric = NormalisedError(scale=2.0)
    metric.update(torch.tensor([[0.5, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    value, error = metric.compute()
    assert value == pytest.approx(1.5 / 4)
    assert error == pytest.approx(100 * 1.5 / 4 / 2.0)


def test_normalised_error_skips_absent_points() -> None:
    metric = NormalisedError(scale=10.0, point_dims=2, masked=True)
    # Present points at distance 5 (3-4-5) and 0; the absent point is 100 away.
    target = torch.tensor(
        [[[3.0, 4.0, 1.0], [100.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]
    )
    output = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    metric.update(output, target)
    value, error = metric.compute()
    assert value == pytest.approx(2.5)
    assert error == pytest.approx(25.0)


def test_normalised_error_without_present_points_is_nan() -> None:
    metric = NormalisedError(scale=1.0, point_dims=2, masked=True)
    metric.update(torch.ones(2, 4), torch.zeros(2, 2, 3))
    value, error = metric.compute()
    assert math.isnan(value)
    assert math.isnan(error)


@pytest.mark.parametrize(
    ("options", "word"), [({"scale": 0.0}, "scale"), ({"scale": 1.0, "point_dims": 0}, "point")]
)
def test_normalised_error_rejects_invalid_options(options: dict, word: str) -> None:
    with pytest.raises(UsageError, match=word):
        NormalisedError(**options)


def test_pixel_error_in_percent_of_range() -> None:
    metric = PixelError(intensity_range=2.0)
    metric.update(torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, -1.0], [0.0, 0.0]]]]))
    metric.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    value, error = metric.compute()
    assert value == pytest.approx(2.0 / 8)
    assert error == pytest.approx(100 * 0.25 / 2.0)


def test_iou_pools_intersection_and_union() -> None:
    metric = IoU()
    # Image 0: predicted {0, 1}, true {1, 2}. Image 1: predicted {3}, true {3}.
    metric.update(
        torch.tensor([[[1.0, 1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, 2.0]]]),
        torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]),
    )
    value, error = metric.compute()
    assert value == pytest.approx(2 / 4)
    assert error == pytest.approx(50.0)


def test_iou_of_empty_masks_is_one() -> None:
    metric = IoU()
    metric.update(-torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3))
    assert metric.compute() == (1.0, 0.0)


@pytest.mark.parametrize(
    ("distances", "labels", "expected"),
    [
        ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.0),
        ([0.1, 0.4, 0.3, 0.5], [1, 1, 0, 0], 50.0),
        ([0.1, 0.2, 0.6, 0.4, 0.5, 0.9], [1, 1, 1, 0, 0, 0], 100 / 3),
        # FAR/FRR go from (0, 1/2) to (1, 1/2): the crossing is halfway, at 1/2.
        ([0.1, 0.5, 0.3], [1, 1, 0], 50.0),
        ([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0], 100.0),
    ],
)
def test_equal_error_rate_by_hand(distances: list, labels: list, expected: float) -> None:
    metric = EqualErrorRate()
    half = len(distances) // 2
    metric.update(torch.tensor(distances[:half]), torch.tensor(labels[:half]))
    metric.update(torch.tensor(distances[half:]), torch.tensor(labels[half:]))
    value, error = metric.compute()
    assert value == pytest.approx(expected)
    assert error == pytest.approx(expected)


def test_equal_error_rate_needs_both_pair_kinds() -> None:
    metric = EqualErrorRate()
    metric.update(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    value, error = metric.compute()
    assert math.isnan(value)
    assert math.isnan(error)
