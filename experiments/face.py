"""``face``: the AFLW face experiment of Dropped Scheduled Task, five tasks on one face crop.

Malhotra, Vatsa and Singh ("Dropped Scheduled Task: Mitigating Negative Transfer in
Multi-task Learning using Dynamic Task Dropping", TMLR 2022) train one VGG16 encoder on the
AFLW faces with a 70/30 train/test split. The input is the face rectangle resized to 224 by
224 pixels with speckle noise on 15 % of its pixels:

| task | kind, loss | depth | labelled training faces | error |
|---|---|---|---|---|
| ``gender`` | binary, BCE | 17 | 50 % | 100 - accuracy |
| ``spectacles`` | binary, BCE | 17 | 75 % | 100 - accuracy |
| ``landmarks`` | 21 (x, y), MSE over present points | 17 | 75 % | mean distance, % of face |
| ``pose`` | yaw, pitch, roll, MSE / 3 | 17 | 40 % | mean absolute error, % of pi |
| ``denoising`` | clean crop, pixel MSE | 26 | 100 % | mean absolute error, % of range |

Landmark coordinates are fractions of the face rectangle, and the pose is in radians. The
heads of the first four tasks read the encoder's last feature map through global average
pooling and four fully connected layers (13 + 4 = 17 layers). The denoising head is the
SegNet decoder, 13 more convolutions that unpool at the encoder's max-pool indices.

The data are read from AFLW's own files, ``aflw.sqlite`` and ``flickr/``
(:mod:`experiments._aflw`). Up to ``lazy_above`` faces are decoded once into memory; a
larger set decodes each face when it is read.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dst._errors import UsageError
from dst._experiment import Experiment, ExperimentData, MultiTaskModel, Task
from dst._metrics import (
    BinaryAccuracy,
    NormalisedError,
    PixelError,
    binary_cross_entropy,
    masked_mse,
    pixel_mse,
    pose_mse,
)
from experiments._aflw import (
    FACE_TASKS,
    N_LANDMARKS,
    FaceDataset,
    FaceImages,
    available_labels,
    draw_labelled_fractions,
    read_aflw,
    split_faces,
)
from experiments._aflw_demo import write_demo_aflw
from experiments._data import check_fraction, check_int
from experiments._face_segnet import (
    DenseHead,
    Encoded,
    SegNetDecoder,
    SegNetEncoder,
    normalise_images,
)

_logger = logging.getLogger(__name__)

LABELLED_FRACTIONS = (0.5, 0.75, 0.75, 0.4, 1.0)
"""Fraction of the training faces labelled for each task, in the order of ``FACE_TASKS``."""

PRESETS: dict[str, dict[str, int]] = {
    "paper": {"width_divisor": 1, "image_size": 224},
    "small": {"width_divisor": 16, "image_size": 64},
}
"""Model width and default image size: the paper's VGG16, or 1/16 of its channels for CPUs."""

HEAD_DEPTH = 17
DECODER_DEPTH = 26
MIN_IMAGE_SIZE = 32
DEMO_IMAGES = 80


class FaceExperiment(Experiment):
    """AFLW faces with gender, spectacles, landmarks, pose and denoising tasks.

    Options:
        data_dir: Folder with ``aflw.sqlite`` and ``flickr/`` (``aflw/data`` in the AFLW
            release).
        preset: ``"paper"`` (VGG16-BN, 224 pixels) or ``"small"`` (1/16 of the channels,
            64 pixels).
        image_size: Side of the face crop in pixels, at least 32; None takes the preset's.
        pretrained_path: Local file with torchvision's ImageNet ``vgg16_bn`` state dict;
            None initialises the encoder at random. Only with the ``paper`` preset.
        labelled_fractions: Fraction of the training faces labelled for each of the five
            tasks, as a sequence or a comma-separated string.
        test_fraction: Fraction of the faces in the test split, fixed by ``split_seed``.
        validation_fraction: Fraction of the other faces held out for validation.
        split_seed: Seed of the train/test split.
        noise_fraction: Fraction of the input pixels with speckle noise.
        noise_std: Standard deviation of the multiplicative speckle noise.
        lazy_above: Number of faces above which crops are decoded per item instead of
            once into memory; 0 makes every set lazy.
        max_faces: Use only the first faces by ``face_id``; None uses all.
    """

    name: ClassVar[str] = "face"
    defaults: ClassVar[dict[str, Any]] = {
        "data_dir": None,
        "preset": "paper",
        "image_size": None,
        "pretrained_path": None,
        "labelled_fractions": LABELLED_FRACTIONS,
        "test_fraction": 0.3,
        "validation_fraction": 0.1,
        "split_seed": 0,
        # NOTE: the paper gives no strength for its speckle noise; 0.5 is this project's choice.
        "noise_fraction": 0.15,
        "noise_std": 0.5,
        "lazy_above": 5000,
        "max_faces": None,
    }
    train_defaults: ClassVar[dict[str, Any]] = {"lr": 5e-5, "batch_size": 16}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        preset = self.options["preset"]
        if preset not in PRESETS:
            raise UsageError(f"invalid option preset={preset!r}; use one of {', '.join(PRESETS)}")
        self.width_divisor = PRESETS[preset]["width_divisor"]
        self.image_size = self._check_image_size()
        self.labelled_fractions = parse_fractions(self.options["labelled_fractions"])
        self.test_fraction = check_fraction(self.options, "test_fraction")
        self.validation_fraction = check_fraction(self.options, "validation_fraction")
        self.split_seed = check_int(self.options, "split_seed", 0)
        self.noise_fraction = check_fraction(self.options, "noise_fraction")
        self.noise_std = check_non_negative(self.options, "noise_std")
        self.lazy_above = check_int(self.options, "lazy_above", 0)
        self.max_faces = None
        if self.options["max_faces"] is not None:
            self.max_faces = check_int(self.options, "max_faces", 10)
        path = self.options["pretrained_path"]
        self.pretrained_path = Path(path) if path else None

    @classmethod
    def demo(cls, folder: Path) -> dict[str, Any]:
        """Write a generated AFLW-format set of 80 images under ``folder``."""
        write_demo_aflw(Path(folder), n_images=DEMO_IMAGES, seed=0)
        return {"data_dir": str(folder), "preset": "small"}

    def load(self, seed: int) -> ExperimentData:
        started = time.perf_counter()
        faces = read_aflw(self._data_dir(), self.max_faces)
        train, validation, test = split_faces(
            len(faces), self.test_fraction, self.validation_fraction, self.split_seed, seed
        )
        lazy = len(faces) > self.lazy_above
        images = FaceImages(faces, self.image_size, lazy=lazy)

        available = available_labels(faces)
        generator = torch.Generator().manual_seed(seed)
        train_labelled = draw_labelled_fractions(
            available[train], self.labelled_fractions, generator
        )
        splits = [
            self._dataset(images, train, train_labelled),
            self._dataset(images, validation, available[validation]),
            self._dataset(images, test, available[test]),
        ]

        _logger.info(
            "loaded %d AFLW faces at %d pixels (%s) in %.1f s: %d train, %d validation,"
            " %d test; labelled training faces per task: %s",
            len(faces),
            self.image_size,
            "decoded per item" if lazy else "decoded into memory",
            time.perf_counter() - started,
            len(train),
            len(validation),
            len(test),
            dict(zip(FACE_TASKS, splits[0].n_labelled, strict=True)),
        )
        return ExperimentData(face_tasks(splits[0].n_labelled), *splits)

    def build_model(self, tasks: Sequence[Task]) -> MultiTaskModel:
        names = [task.name for task in tasks]
        if names != list(FACE_TASKS):
            raise UsageError(
                f"the face model needs the tasks {list(FACE_TASKS)} in this order, got"
                f" {names}; build it from the tasks that load() returns"
            )
        return FaceModel(self.width_divisor, self.pretrained_path)

    def _data_dir(self) -> Path:
        data_dir = self.options["data_dir"]
        if data_dir is None:
            raise UsageError(
                "experiment 'face' needs data_dir, the folder with aflw.sqlite and flickr/;"
                " give --data-dir or use --demo"
            )
        return Path(data_dir)

    def _dataset(self, images: FaceImages, indices: list[int], labelled: Tensor) -> FaceDataset:
        return FaceDataset(
            images,
            indices,
            labelled,
            noise_fraction=self.noise_fraction,
            noise_std=self.noise_std,
            noise_seed=self.split_seed,
        )

    def _check_image_size(self) -> int:
        if self.options["image_size"] is None:
            return PRESETS[self.options["preset"]]["image_size"]
        return check_int(self.options, "image_size", MIN_IMAGE_SIZE)


def face_tasks(n_labelled: Sequence[int]) -> list[Task]:
    """Return the five face tasks with their labelled training counts."""
    specs = [
        ("binary", binary_cross_entropy, BinaryAccuracy, HEAD_DEPTH),
        ("binary", binary_cross_entropy, BinaryAccuracy, HEAD_DEPTH),
        ("regression", masked_mse, landmark_error, HEAD_DEPTH),
        ("regression", pose_mse, pose_error, HEAD_DEPTH),
        ("denoising", pixel_mse, PixelError, DECODER_DEPTH),
    ]
    return [
        Task(name, kind, loss, metric, depth, int(count))
        for name, (kind, loss, metric, depth), count in zip(
            FACE_TASKS, specs, n_labelled, strict=True
        )
    ]


def landmark_error() -> NormalisedError:
    """Return the landmark metric: mean distance over present points, in face-rectangle units."""
    return NormalisedError(scale=1.0, point_dims=2, masked=True)


def pose_error() -> NormalisedError:
    """Return the pose metric: mean absolute angle error in radians, in percent of pi."""
    return NormalisedError(scale=math.pi, point_dims=1)


class FaceModel(MultiTaskModel):
    """VGG16-BN encoder, four dense heads and a SegNet decoder head for denoising.

    Args:
        width_divisor: Divides every channel count of VGG16; 1 is the paper's network.
        pretrained_path: Local ImageNet ``vgg16_bn`` weights for the encoder, or None.
    """

    def __init__(self, width_divisor: int = 1, pretrained_path: Path | None = None) -> None:
        super().__init__()
        self.encoder = SegNetEncoder(width_divisor, pretrained_path)
        channels = self.encoder.out_channels
        self.heads = nn.ModuleList(
            [
                DenseHead(channels, 1),
                DenseHead(channels, 1),
                DenseHead(channels, 2 * N_LANDMARKS),
                DenseHead(channels, 3),
                DenoisingHead(width_divisor),
            ]
        )

    def shared(self, inputs: Tensor) -> Encoded:
        return self.encoder(normalise_images(inputs))


class DenoisingHead(nn.Module):
    """The SegNet decoder with a last convolution to RGB and a sigmoid, for images in [0, 1]."""

    def __init__(self, width_divisor: int) -> None:
        super().__init__()
        self.decoder = SegNetDecoder(width_divisor)
        self.output = nn.Conv2d(self.decoder.out_channels, 3, kernel_size=3, padding=1)

    def forward(self, encoded: Encoded) -> Tensor:
        return torch.sigmoid(self.output(self.decoder(encoded)))


def parse_fractions(value: Any) -> tuple[float, ...]:
    """Return five labelled fractions in [0, 1] from a sequence or a comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        fractions = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != len(FACE_TASKS) or not all(0 <= f <= 1 for f in fractions):
        raise UsageError(
            f"invalid option labelled_fractions={value!r}; use {len(FACE_TASKS)} fractions"
            f" in [0, 1], one per task ({', '.join(FACE_TASKS)}), such as 0.5,0.75,0.75,0.4,1"
        )
    return fractions


def check_non_negative(options: dict[str, Any], name: str) -> float:
    """Return the option ``name`` as a float, raising UsageError unless it is 0 or more."""
    value = options[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number >= 0):
        raise UsageError(f"invalid option {name}={value!r}; use a number of 0 or more")
    return number
