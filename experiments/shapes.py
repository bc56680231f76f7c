"""``shapes``: a generated five-task data set shaped like the face experiment of DST.

Each sample is a small RGB image of one shape (circle, square, triangle or cross), filled or
drawn as an outline, rotated, scaled and placed at random on a tinted background, sometimes
partly hidden by a grey occluding rectangle. Speckle noise covers about 15 % of the pixels
of the input, and the clean image is the target of the denoising task. The tasks mirror the face
experiment of Malhotra et al. (Dropped Scheduled Task, TMLR 2022), which has two binary
attributes, 21 landmarks with a presence mask, the head pose and denoising:

| task | kind, loss | labelled training samples | metric |
|---|---|---|---|
| ``kind`` | 4 classes, cross-entropy | 50 % | accuracy |
| ``filled`` | binary, BCE | 75 % | accuracy |
| ``corners`` | 4 points (x, y), MSE over present points | 75 % | mean distance, % of image size |
| ``pose`` | centre x, centre y and size, MSE / 3 | 40 % | mean absolute error, % of size |
| ``denoising`` | clean image, pixel MSE | 100 % | mean absolute error, % of range |

``corners`` are the corners of the shape's axis-aligned bounding box. A corner is absent
when it falls outside the image or under the occluder. Coordinates and sizes are fractions
of the image size.

The ``data_seed`` option fixes the generated images and the 70/30 train/test split, so the
test split is the same for every run. The run seed draws which training samples are
labelled for each task and which are held out for validation. Every test sample is labelled
for every task.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dst._errors import UsageError
from dst._experiment import Experiment, ExperimentData, MultiTaskModel, Task, split_validation
from dst._metrics import (
    Accuracy,
    BinaryAccuracy,
    NormalisedError,
    PixelError,
    binary_cross_entropy,
    cross_entropy,
    masked_mse,
    pixel_mse,
    pose_mse,
)
from experiments._data import (
    TensorTaskDataset,
    check_fraction,
    check_int,
    derive_seed,
    draw_labelled,
)
from experiments._vgg import DenseBranch, EncoderFeatures, EncoderHead, SegNetDecoder, VGGEncoder

_logger = logging.getLogger(__name__)

SHAPE_KINDS = ("circle", "square", "triangle", "cross")
TASK_NAMES = ("kind", "filled", "corners", "pose", "denoising")
LABELLED_FRACTIONS = (0.5, 0.75, 0.75, 0.4, 1.0)
"""Fraction of the training samples labelled for each task, in the order of ``TASK_NAMES``."""

TRAIN_FRACTION = 0.7
NOISE_FRACTION = 0.15
RADIUS_RANGE = (0.2, 0.35)
"""Smallest and largest shape radius, in fractions of the image size."""
N_CORNERS = 4
N_POOLS = 3
"""Encoder stages, each halving the image, so ``image_size`` must be a multiple of 8."""


class ShapesExperiment(Experiment):
    """Generated shapes with five tasks of mixed type, trained on a CPU in seconds.

    Options:
        n_samples: Number of generated images, 70 % for training and 30 % for test.
        image_size: Height and width of the images in pixels, a multiple of 8.
        validation_fraction: Fraction of the training images held out for validation.
        width: Channels of the first encoder stage. The next stages have 2 and 4 times
            as many.
        data_seed: Seed of the generated images and of the train/test split.
    """

    name: ClassVar[str] = "shapes"
    defaults: ClassVar[dict[str, Any]] = {
        "n_samples": 2000,
        "image_size": 32,
        "validation_fraction": 0.1,
        "width": 8,
        "data_seed": 0,
    }
    train_defaults: ClassVar[dict[str, Any]] = {"lr": 2e-3, "batch_size": 32}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.n_samples = check_int(self.options, "n_samples", 20)
        self.image_size = check_int(self.options, "image_size", 16)
        if self.image_size % 2**N_POOLS:
            raise UsageError(
                f"invalid option image_size={self.image_size}; use a multiple of"
                f" {2**N_POOLS} such as 32"
            )
        self.validation_fraction = check_fraction(self.options, "validation_fraction")
        self.width = check_int(self.options, "width", 1)
        self.data_seed = check_int(self.options, "data_seed", 0)

    def load(self, seed: int) -> ExperimentData:
        started = time.perf_counter()
        images = generate_shapes(self.n_samples, self.image_size, self.data_seed)
        n_train = round(TRAIN_FRACTION * self.n_samples)
        pool = _make_split(images, slice(0, n_train), labelled_seed=seed)
        test = _make_split(images, slice(n_train, None), labelled_seed=None)
        train, validation = split_validation(pool, self.validation_fraction, seed)
        n_labelled = pool.mask[train.indices].sum(dim=0).tolist()
        tasks = self._make_tasks(n_labelled)
        _logger.info(
            "generated %d shapes of %dx%d pixels in %.2f s: %d train, %d validation, %d test",
            self.n_samples,
            self.image_size,
            self.image_size,
            time.perf_counter() - started,
            len(train),
            len(validation),
            len(test),
        )
        return ExperimentData(tasks=tasks, train=train, validation=validation, test=test)

    def build_model(self, tasks: Sequence[Task]) -> MultiTaskModel:
        return ShapesModel(self.image_size, self.width, [task.name for task in tasks])

    def _make_tasks(self, n_labelled: Sequence[int]) -> list[Task]:
        encoder_depth = sum(len(stage) for stage in _encoder_stages(self.width))
        head_depth = encoder_depth + ShapesModel.n_dense_layers
        decoder_depth = 2 * encoder_depth
        specs = [
            ("classification", cross_entropy, Accuracy, head_depth),
            ("binary", binary_cross_entropy, BinaryAccuracy, head_depth),
            ("regression", masked_mse, _corner_error, head_depth),
            ("regression", pose_mse, _pose_error, head_depth),
            ("denoising", pixel_mse, PixelError, decoder_depth),
        ]
        return [
            Task(name, kind, loss, metric, depth, int(count))
            for name, (kind, loss, metric, depth), count in zip(
                TASK_NAMES, specs, n_labelled, strict=True
            )
        ]


def _corner_error() -> NormalisedError:
    return NormalisedError(scale=1.0, point_dims=2, masked=True)


def _pose_error() -> NormalisedError:
    return NormalisedError(scale=1.0, point_dims=1)


def _encoder_stages(width: int) -> list[tuple[int, int]]:
    return [(width, width), (2 * width, 2 * width), (4 * width, 4 * width)]


class ShapesModel(MultiTaskModel):
    """A VGG-style encoder with four dense heads and a SegNet-style decoder for denoising.

    The heads of ``kind``, ``filled``, ``corners`` and ``pose`` flatten the last encoder
    feature map into two fully connected layers. The denoising head mirrors the encoder, so
    its depth is twice the encoder's.
    """

    n_dense_layers: ClassVar[int] = 2
    hidden_features: ClassVar[int] = 128

    def __init__(self, image_size: int, width: int, task_names: Sequence[str]) -> None:
        super().__init__()
        if list(task_names) != list(TASK_NAMES):
            raise UsageError(
                f"the shapes model needs the tasks {list(TASK_NAMES)} in this order,"
                f" got {list(task_names)}; build it from the tasks that load() returns"
            )
        self.encoder = VGGEncoder(3, _encoder_stages(width))
        feature_size = image_size // 2**N_POOLS
        in_features = self.encoder.out_channels * feature_size**2
        out_features = [len(SHAPE_KINDS), 1, 2 * N_CORNERS, 3]
        heads: list[torch.nn.Module] = [
            EncoderHead(DenseBranch(in_features, [self.hidden_features], n_out))
            for n_out in out_features
        ]
        heads.append(SegNetDecoder(self.encoder, out_channels=3))
        self.heads = torch.nn.ModuleList(heads)

    def shared(self, inputs: Tensor) -> EncoderFeatures:
        return self.encoder(inputs)


def _make_split(images: dict[str, Tensor], rows: slice, labelled_seed: int | None) -> Any:
    """Build the data set of ``rows``, labelled at random when ``labelled_seed`` is set."""
    targets = [
        images["kind"][rows],
        images["filled"][rows],
        images["corners"][rows],
        images["pose"][rows],
        images["clean"][rows],
    ]
    n_samples = targets[0].shape[0]
    if labelled_seed is None:
        mask = torch.ones(n_samples, len(TASK_NAMES), dtype=torch.bool)
    else:
        generator = torch.Generator().manual_seed(derive_seed(labelled_seed, "labels"))
        columns = [draw_labelled(n_samples, f, generator) for f in LABELLED_FRACTIONS]
        mask = torch.stack(columns, dim=1)
        targets = [_zero_unlabelled(target, mask[:, i]) for i, target in enumerate(targets)]
    return TensorTaskDataset(images["noisy"][rows], targets, mask)


def _zero_unlabelled(target: Tensor, labelled: Tensor) -> Tensor:
    """Replace the targets of unlabelled samples by zeros, the placeholder of this data set."""
    shape = (labelled.shape[0],) + (1,) * (target.dim() - 1)
    return torch.where(labelled.view(shape), target, torch.zeros_like(target))


def generate_shapes(n_samples: int, image_size: int, seed: int) -> dict[str, Tensor]:
    """Generate shape images and their labels, the same for the same arguments.

    Returns:
        A dict of tensors with ``n_samples`` rows: ``noisy`` and ``clean`` images
        ``(3, image_size, image_size)`` in [0, 1], ``kind`` (class index), ``filled``
        (0 or 1), ``corners`` ``(4, 3)`` with x, y and presence, and ``pose`` (centre x,
        centre y, size). Lengths are fractions of ``image_size``.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, "shapes"))

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    kind = torch.randint(len(SHAPE_KINDS), (n_samples,), generator=generator)
    filled = torch.rand(n_samples, generator=generator) < 0.5
    centre = uniform(0.2, 0.8, n_samples, 2) * image_size
    radius = uniform(*RADIUS_RANGE, n_samples) * image_size
    angle = uniform(0.0, 2 * math.pi, n_samples)
    background = uniform(0.05, 0.35, n_samples, 3)
    colour = uniform(0.55, 1.0, n_samples, 3)
    occluder = _draw_occluders(n_samples, image_size, generator)

    shape_mask = _rasterise(kind, filled, centre, radius, angle, image_size)
    occluded = _rectangle_mask(occluder, image_size)
    clean = torch.where(
        shape_mask[:, None], colour[:, :, None, None], background[:, :, None, None]
    )
    clean = torch.where(occluded[:, None], occluder["grey"][:, None, None, None], clean)
    noisy = _add_speckle(clean, generator)

    corners = _bounding_corners(kind, centre, radius, angle)
    present = _corner_presence(corners, occluder, image_size)
    return {
        "noisy": noisy,
        "clean": clean,
        "kind": kind,
        "filled": filled.float(),
        "corners": torch.cat([corners / image_size, present[:, :, None].float()], dim=2),
        "pose": torch.stack([centre[:, 0], centre[:, 1], 2 * radius], dim=1) / image_size,
    }


def _draw_occluders(n_samples: int, image_size: int, generator: torch.Generator) -> dict:
    """Draw a grey rectangle for 30 % of the images and an empty one for the rest."""
    has_occluder = torch.rand(n_samples, generator=generator) < 0.3
    size = (0.2 + 0.25 * torch.rand(n_samples, 2, generator=generator)) * image_size
    low = torch.rand(n_samples, 2, generator=generator) * (image_size - size)
    high = torch.where(has_occluder[:, None], low + size, low)
    grey = 0.4 + 0.1 * torch.rand(n_samples, generator=generator)
    return {"low": low, "high": high, "grey": grey}


def _pixel_grid(image_size: int) -> tuple[Tensor, Tensor]:
    """Return the x and y coordinates of the pixel centres, each ``(1, size, size)``."""
    coordinates = torch.arange(image_size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    return x[None], y[None]


def _rasterise(
    kind: Tensor, filled: Tensor, centre: Tensor, radius: Tensor, angle: Tensor, image_size: int
) -> Tensor:
    """Return the bool pixel mask of every shape, ``(n_samples, size, size)``."""
    x, y = _pixel_grid(image_size)
    dx = x - centre[:, 0, None, None]
    dy = y - centre[:, 1, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    scale = radius[:, None, None]
    # Shape coordinates: rotated into the shape's frame, 1 at the radius.
    u = (cos * dx + sin * dy) / scale
    v = (-sin * dx + cos * dy) / scale
    shape_mask = _inside(kind, u, v)
    # An outline keeps the border pixels: the mask minus its erosion by a 3x3 square.
    eroded = -F.max_pool2d(-shape_mask[:, None].float(), kernel_size=3, stride=1, padding=1)
    return shape_mask & (filled[:, None, None] | (eroded[:, 0] < 0.5))


def _inside(kind: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Return whether each point ``(u, v)`` of the shape frame is inside the sample's shape."""
    inside = torch.stack(
        [
            u**2 + v**2 <= 1,
            torch.maximum(u.abs(), v.abs()) <= 0.8,
            (v >= -0.5) & (v <= 1 - math.sqrt(3) * u.abs()),
            ((u.abs() <= 0.4) & (v.abs() <= 1)) | ((v.abs() <= 0.4) & (u.abs() <= 1)),
        ]
    )
    return inside[kind, torch.arange(kind.shape[0])]


def _shape_vertices() -> Tensor:
    """Return outline points of each kind in the shape frame, ``(n_kinds, 64, 2)``."""
    n_points = 64
    turn = torch.linspace(0, 2 * math.pi, n_points + 1)[:-1]
    circle = torch.stack([turn.cos(), turn.sin()], dim=1)
    square = torch.tensor([[0.8, 0.8], [-0.8, 0.8], [-0.8, -0.8], [0.8, -0.8]])
    triangle = torch.tensor([[0.0, 1.0], [math.sqrt(3) / 2, -0.5], [-math.sqrt(3) / 2, -0.5]])
    arm = torch.tensor([[1.0, 0.4], [1.0, -0.4], [-1.0, 0.4], [-1.0, -0.4]])
    cross = torch.cat([arm, arm.flip(1)])
    polygons = [circle, square, triangle, cross]
    # Repeat points so that every kind has the same number. The bounding box stays the same.
    return torch.stack([polygon.repeat(n_points, 1)[:n_points] for polygon in polygons])


def _bounding_corners(kind: Tensor, centre: Tensor, radius: Tensor, angle: Tensor) -> Tensor:
    """Return the corners of each shape's bounding box in pixels, ``(n_samples, 4, 2)``.

    The order is top left, top right, bottom left, bottom right.
    """
    vertices = _shape_vertices()[kind]
    u, v = vertices[..., 0], vertices[..., 1]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    x = centre[:, 0, None] + radius[:, None] * (cos * u - sin * v)
    y = centre[:, 1, None] + radius[:, None] * (sin * u + cos * v)
    left, right = x.min(dim=1).values, x.max(dim=1).values
    top, bottom = y.min(dim=1).values, y.max(dim=1).values
    xs = torch.stack([left, right, left, right], dim=1)
    ys = torch.stack([top, top, bottom, bottom], dim=1)
    return torch.stack([xs, ys], dim=2)


def _rectangle_mask(occluder: dict[str, Tensor], image_size: int) -> Tensor:
    """Return the bool pixel mask of each occluder, ``(n_samples, size, size)``."""
    x, y = _pixel_grid(image_size)
    return _covers(occluder, x, y)


def _covers(occluder: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Return whether each occluder covers the points ``(x, y)`` broadcast to its samples."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    low, high = occluder["low"], occluder["high"]
    inside_x = (x >= low[:, 0].view(shape)) & (x < high[:, 0].view(shape))
    inside_y = (y >= low[:, 1].view(shape)) & (y < high[:, 1].view(shape))
    return inside_x & inside_y


def _corner_presence(corners: Tensor, occluder: dict[str, Tensor], image_size: int) -> Tensor:
    """Return whether each corner lies inside the image and outside the occluder."""
    x, y = corners[..., 0], corners[..., 1]
    in_image = (x >= 0) & (x < image_size) & (y >= 0) & (y < image_size)
    return in_image & ~_covers(occluder, x, y)


def _add_speckle(clean: Tensor, generator: torch.Generator) -> Tensor:
    """Add speckle noise, ``x + x * n`` with ``n ~ N(0, 1)``, to about 15 % of the pixels."""
    n_samples, _, height, width = clean.shape
    chosen = torch.rand(n_samples, 1, height, width, generator=generator) < NOISE_FRACTION
    noise = torch.randn(clean.shape, generator=generator)
    noisy = torch.where(chosen, clean + clean * noise, clean)
    return noisy.clamp(0, 1)
