"""The generated ``shapes`` experiment: data, labels, model and a short training run."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from dst import UsageError, create_experiment
from dst._trainer import TrainConfig, train_experiment
from experiments.shapes import (
    LABELLED_FRACTIONS,
    NOISE_FRACTION,
    TASK_NAMES,
    ShapesExperiment,
    generate_shapes,
)

SMALL = {"n_samples": 200, "image_size": 16, "width": 4}


def test_generation_repeats_for_same_seed() -> None:
    first = generate_shapes(50, 16, seed=3)
    second = generate_shapes(50, 16, seed=3)
    other = generate_shapes(50, 16, seed=4)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["clean"], other["clean"])


def test_generation_is_fast() -> None:
    # CPU time of this process, so that other processes on a busy machine do not count.
    started = time.process_time()
    generate_shapes(2000, 32, seed=0)
    assert time.process_time() - started < 2.0


def test_generated_values_in_range() -> None:
    images = generate_shapes(400, 32, seed=0)
    assert images["noisy"].shape == (400, 3, 32, 32)
    assert images["clean"].min() >= 0
    assert images["clean"].max() <= 1
    assert images["noisy"].min() >= 0
    assert images["noisy"].max() <= 1
    assert set(images["kind"].unique().tolist()) == {0, 1, 2, 3}
    assert set(images["filled"].unique().tolist()) == {0.0, 1.0}
    assert images["corners"].shape == (400, 4, 3)
    assert images["pose"].shape == (400, 3)
    assert ((images["pose"] > 0) & (images["pose"] < 1)).all()


def test_speckle_noise_covers_about_15_percent() -> None:
    images = generate_shapes(400, 32, seed=0)
    changed = (images["noisy"] != images["clean"]).any(dim=1).float().mean().item()
    assert NOISE_FRACTION - 0.03 < changed <= NOISE_FRACTION + 0.01


def test_corners_bound_the_shape() -> None:
    images = generate_shapes(300, 32, seed=1)
    clean, corners = images["clean"], images["corners"]
    # Only shape colours have every channel at 0.55 or more; backgrounds and occluders are
    # darker. Every shape pixel must lie inside the bounding box, with one pixel of tolerance.
    shape_pixels = clean.min(dim=1).values >= 0.55
    for index in range(100):
        rows, columns = shape_pixels[index].nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        left, top = corners[index, 0, :2] * 32
        right, bottom = corners[index, 3, :2] * 32
        assert columns.min() + 0.5 >= left - 1.0
        assert columns.max() + 0.5 <= right + 1.0
        assert rows.min() + 0.5 >= top - 1.0
        assert rows.max() + 0.5 <= bottom + 1.0


def test_corners_outside_image_are_absent() -> None:
    corners = generate_shapes(1000, 32, seed=0)["corners"]
    xy, present = corners[..., :2], corners[..., 2]
    outside = ((xy < 0) | (xy >= 1)).any(dim=2)
    assert outside.any()
    assert (present[outside] == 0).all()
    # Occluders hide some corners that lie inside the image.
    assert ((present == 0) & ~outside).any()
    assert 0.5 < present.mean().item() < 1.0


def test_test_split_fixed_across_run_seeds() -> None:
    experiment = ShapesExperiment(**SMALL)
    first, second = experiment.load(seed=0), experiment.load(seed=1)
    for index in (0, 17, len(first.test) - 1):
        inputs_a, targets_a, mask_a = first.test[index]
        inputs_b, targets_b, mask_b = second.test[index]
        assert torch.equal(inputs_a, inputs_b)
        assert all(torch.equal(a, b) for a, b in zip(targets_a, targets_b, strict=True))
        assert mask_a.all()
        assert mask_b.all()


def test_run_seed_draws_labels_and_validation() -> None:
    experiment = ShapesExperiment(**SMALL)
    first, second = experiment.load(seed=0), experiment.load(seed=1)
    assert first.train.indices != second.train.indices
    assert not torch.equal(first.train.dataset.mask, second.train.dataset.mask)
    again = experiment.load(seed=0)
    assert first.train.indices == again.train.indices
    assert torch.equal(first.train.dataset.mask, again.train.dataset.mask)


def test_split_sizes_follow_70_30_and_validation() -> None:
    data = ShapesExperiment(**SMALL, validation_fraction=0.2).load(seed=0)
    assert len(data.train) + len(data.validation) == 140
    assert len(data.test) == 60
    assert len(data.validation) == 28


def test_random_draws_independent_of_labels() -> None:
    data = ShapesExperiment(n_samples=2000, image_size=16, width=4).load(seed=0)
    pool = data.train.dataset
    filled = pool.targets[1] > 0.5
    kind = generate_shapes(2000, 16, seed=0)["kind"][:1400]
    in_validation = torch.zeros(len(pool), dtype=torch.bool)
    in_validation[data.validation.indices] = True
    # Seed 0 both generates the data and draws the labels and the validation split, so a
    # shared random stream would tie these draws to the data.
    for draw in [in_validation, pool.mask[:, 0], pool.mask[:, 3]]:
        share = draw.float().mean()
        assert abs(draw[kind == 0].float().mean() - share) < 0.1
        assert abs(draw[kind == 3].float().mean() - share) < 0.1
    assert abs(pool.mask[filled, 2].float().mean() - 0.75) < 0.1


def test_labelled_counts_match_fractions() -> None:
    data = ShapesExperiment(**SMALL).load(seed=0)
    pool_mask = data.train.dataset.mask
    assert pool_mask.sum(dim=0).tolist() == [round(f * 140) for f in LABELLED_FRACTIONS]
    for index, task in enumerate(data.tasks):
        counted = sum(bool(data.train[i][2][index]) for i in range(len(data.train)))
        assert task.n_labelled == counted, task.name


def test_unlabelled_targets_are_zero_placeholders() -> None:
    data = ShapesExperiment(**SMALL).load(seed=0)
    pool = data.train.dataset
    for index, target in enumerate(pool.targets):
        unlabelled = ~pool.mask[:, index]
        if unlabelled.any():
            assert (target[unlabelled] == 0).all(), TASK_NAMES[index]


def test_tasks_mirror_face_setup() -> None:
    data = ShapesExperiment(**SMALL).load(seed=0)
    assert [task.name for task in data.tasks] == list(TASK_NAMES)
    kinds = [task.kind for task in data.tasks]
    assert kinds == ["classification", "binary", "regression", "regression", "denoising"]
    depths = [task.depth for task in data.tasks]
    assert depths[:4] == [8, 8, 8, 8]
    assert depths[4] == 12


def test_model_outputs_fit_losses_and_metrics() -> None:
    experiment = ShapesExperiment(**SMALL)
    data = experiment.load(seed=0)
    model = experiment.build_model(data.tasks)
    batch = [data.train[i] for i in range(6)]
    inputs = torch.stack([item[0] for item in batch])
    targets = [torch.stack([item[1][t] for item in batch]) for t in range(len(data.tasks))]
    outputs = model(inputs)
    assert outputs[4].shape == inputs.shape
    for task, output, target in zip(data.tasks, outputs, targets, strict=True):
        loss = task.loss(output, target)
        assert loss.shape == (6,), task.name
        assert torch.isfinite(loss).all(), task.name
        metric = task.metric()
        metric.update(output.detach(), target)
        value, error = metric.compute()
        assert math.isfinite(error), task.name


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"image_size": 30}, "image_size"),
        ({"n_samples": 5}, "n_samples"),
        ({"validation_fraction": 1.5}, "validation_fraction"),
        ({"width": "wide"}, "width"),
    ],
)
def test_invalid_options_raise_usage_error(options: dict, word: str) -> None:
    with pytest.raises(UsageError, match=word):
        ShapesExperiment(**options)


def test_unknown_option_raises_usage_error() -> None:
    with pytest.raises(UsageError, match="n_epoch"):
        create_experiment("shapes", {"n_epoch": 3})


def test_training_lowers_validation_error() -> None:
    experiment = ShapesExperiment(n_samples=300, image_size=16, width=4)
    config = TrainConfig(n_epochs=4, device="cpu", seed=0)
    _, result = train_experiment(experiment, "mtl", config)
    errors = np.array([record.val_avg_error for record in result.records])
    assert np.isfinite(errors).all()
    assert errors[-1] < errors[0] - 10
