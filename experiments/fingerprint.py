"""``fingerprint``: the bilateral fingerprint experiment of Dropped Scheduled Task.

Malhotra, Vatsa and Singh ("Dropped Scheduled Task: Mitigating Negative Transfer in
Multi-task Learning using Dynamic Task Dropping", TMLR 2022) feed a pair of a fingerprint
and a latent fingerprint, each 340 by 280 pixels, to a Siamese encoder-decoder:

| task | kind, loss | depth | error |
|---|---|---|---|
| ``fingerprint_orientation`` | 6 pattern classes, cross-entropy | 17 | 100 - accuracy |
| ``fingerprint_segmentation`` | foreground mask, pixel BCE | 26 | 100 - 100 * IoU |
| ``latent_orientation`` | 6 pattern classes, cross-entropy | 17 | 100 - accuracy |
| ``latent_segmentation`` | foreground mask, pixel BCE | 26 | 100 - 100 * IoU |
| ``matching`` | same finger or not, contrastive loss | 13 | equal error rate |

Both images pass through the same VGG16-BN encoder, and both segmentation heads use the same
SegNet decoder. Only the last layer of each head belongs to its task. The orientation heads
read the encoder's last feature map through global average pooling and four fully connected
layers. The matching head compares the L2-normalised, globally averaged encoder features
of the two images, so its distance lies in [0, 2] and its depth is that of the encoder.

The pairs come from a CSV manifest (:mod:`experiments._fingerprint_data`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dst._errors import UsageError
from dst._experiment import Experiment, ExperimentData, MultiTaskModel, Task
from dst._metrics import (
    Accuracy,
    EqualErrorRate,
    IoU,
    contrastive_loss,
    cross_entropy,
    pixel_binary_cross_entropy,
)
from experiments._data import check_fraction, check_int
from experiments._face_segnet import (
    DenseHead,
    Encoded,
    SegNetDecoder,
    SegNetEncoder,
    normalise_images,
)
from experiments._fingerprint_data import (
    FINGERPRINT_CLASSES,
    FINGERPRINT_TASKS,
    MANIFEST_NAME,
    FingerprintDataset,
    PairImages,
    available_labels,
    read_manifest,
    split_pairs,
)
from experiments._fingerprint_demo import write_demo_fingerprints
from experiments.face import check_non_negative

_logger = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, int]] = {
    "paper": {"width_divisor": 1, "image_height": 340, "image_width": 280},
    "small": {"width_divisor": 16, "image_height": 64, "image_width": 48},
}
"""Model width and default image size: the paper's VGG16, or 1/16 of its channels for CPUs."""

ORIENTATION_DEPTH = 17
SEGMENTATION_DEPTH = 26
MATCHING_DEPTH = 13
MIN_IMAGE_SIZE = 32
DEMO_PAIRS = 60
SOURCES = ("fingerprint", "latent")


class FingerprintExperiment(Experiment):
    """Fingerprint and latent pairs with orientation, segmentation and matching tasks.

    Options:
        data_dir: Folder with the manifest; its paths are relative to this folder.
        manifest: File name of the manifest in ``data_dir``.
        preset: ``"paper"`` (VGG16-BN, 340 by 280 pixels) or ``"small"`` (1/16 of the
            channels, 64 by 48 pixels).
        image_height: Height of the images in pixels, at least 32; None takes the preset's.
        image_width: Width of the images in pixels, at least 32; None takes the preset's.
        pretrained_path: Local file with torchvision's ImageNet ``vgg16_bn`` state dict;
            None initialises the encoder at random. Only with the ``paper`` preset.
        margin: Margin of the contrastive loss, a distance in (0, 2].
        test_fraction: Fraction of the pairs drawn for the test split when the manifest
            has no ``split`` column.
        validation_fraction: Fraction of the training pairs held out for validation.
        split_seed: Seed of the drawn train/test split.
        lazy_above: Number of pairs above which images are decoded per item instead of
            once into memory; 0 makes every set lazy.
        max_pairs: Use only the first manifest rows; None uses all.
    """

    name: ClassVar[str] = "fingerprint"
    defaults: ClassVar[dict[str, Any]] = {
        "data_dir": None,
        "manifest": MANIFEST_NAME,
        "preset": "paper",
        "image_height": None,
        "image_width": None,
        "pretrained_path": None,
        "margin": 1.0,
        "test_fraction": 0.3,
        "validation_fraction": 0.1,
        "split_seed": 0,
        "lazy_above": 2000,
        "max_pairs": None,
    }
    train_defaults: ClassVar[dict[str, Any]] = {"lr": 5e-5, "batch_size": 4}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        preset = self.options["preset"]
        if preset not in PRESETS:
            raise UsageError(f"invalid option preset={preset!r}; use one of {', '.join(PRESETS)}")
        self.width_divisor = PRESETS[preset]["width_divisor"]
        self.image_size = (self._check_size("image_height"), self._check_size("image_width"))
        self.margin = check_non_negative(self.options, "margin")
        if not 0 < self.margin <= 2:
            raise UsageError(
                f"invalid option margin={self.margin}; use a distance in (0, 2], such as 1.0,"
                " because the embeddings have unit length"
            )
        self.test_fraction = check_fraction(self.options, "test_fraction")
        self.validation_fraction = check_fraction(self.options, "validation_fraction")
        self.split_seed = check_int(self.options, "split_seed", 0)
        self.lazy_above = check_int(self.options, "lazy_above", 0)
        self.max_pairs = None
        if self.options["max_pairs"] is not None:
            self.max_pairs = check_int(self.options, "max_pairs", 4)
        path = self.options["pretrained_path"]
        self.pretrained_path = Path(path) if path else None

    @classmethod
    def demo(cls, folder: Path) -> dict[str, Any]:
        """Write a generated set of 60 pairs with its manifest under ``folder``."""
        write_demo_fingerprints(Path(folder), n_pairs=DEMO_PAIRS, seed=0)
        return {"data_dir": str(folder), "preset": "small"}

    def load(self, seed: int) -> ExperimentData:
        started = time.perf_counter()
        pairs = read_manifest(self._manifest_path(), self.max_pairs)
        train, validation, test = split_pairs(
            pairs, self.test_fraction, self.validation_fraction, self.split_seed, seed
        )
        lazy = len(pairs) > self.lazy_above
        images = PairImages(pairs, self.image_size, lazy=lazy)
        available = available_labels(pairs)
        splits = [
            FingerprintDataset(images, indices, available[indices])
            for indices in (train, validation, test)
        ]

        _logger.info(
            "loaded %d fingerprint pairs at %dx%d pixels (%s) in %.1f s: %d train,"
            " %d validation, %d test; labelled training pairs per task: %s",
            len(pairs),
            *self.image_size,
            "decoded per item" if lazy else "decoded into memory",
            time.perf_counter() - started,
            len(train),
            len(validation),
            len(test),
            dict(zip(FINGERPRINT_TASKS, splits[0].n_labelled, strict=True)),
        )
        return ExperimentData(fingerprint_tasks(splits[0].n_labelled, self.margin), *splits)

    def build_model(self, tasks: Sequence[Task]) -> MultiTaskModel:
        names = [task.name for task in tasks]
        if names != list(FINGERPRINT_TASKS):
            raise UsageError(
                f"the fingerprint model needs the tasks {list(FINGERPRINT_TASKS)} in this"
                f" order, got {names}; build it from the tasks that load() returns"
            )
        return FingerprintModel(self.width_divisor, self.pretrained_path)

    def _manifest_path(self) -> Path:
        data_dir = self.options["data_dir"]
        if data_dir is None:
            raise UsageError(
                "experiment 'fingerprint' needs data_dir, the folder with the pairs manifest;"
                " give --data-dir or use --demo"
            )
        return Path(data_dir) / str(self.options["manifest"])

    def _check_size(self, name: str) -> int:
        if self.options[name] is None:
            return PRESETS[self.options["preset"]][name]
        return check_int(self.options, name, MIN_IMAGE_SIZE)


def fingerprint_tasks(n_labelled: Sequence[int], margin: float) -> list[Task]:
    """Return the five fingerprint tasks with their labelled training counts."""
    specs = [
        ("classification", cross_entropy, Accuracy, ORIENTATION_DEPTH),
        ("segmentation", pixel_binary_cross_entropy, IoU, SEGMENTATION_DEPTH),
        ("classification", cross_entropy, Accuracy, ORIENTATION_DEPTH),
        ("segmentation", pixel_binary_cross_entropy, IoU, SEGMENTATION_DEPTH),
        ("verification", contrastive_loss(margin), EqualErrorRate, MATCHING_DEPTH),
    ]
    return [
        Task(name, kind, loss, metric, depth, int(count))
        for name, (kind, loss, metric, depth), count in zip(
            FINGERPRINT_TASKS, specs, n_labelled, strict=True
        )
    ]


class FingerprintModel(MultiTaskModel):
    """A Siamese VGG16-BN encoder and SegNet decoder with five task heads.

    ``shared`` encodes both images of a pair in one batch and returns their encodings by
    source, ``{"fingerprint": Encoded, "latent": Encoded}``.

    Args:
        width_divisor: Divides every channel count of VGG16; 1 is the paper's network.
        pretrained_path: Local ImageNet ``vgg16_bn`` weights for the encoder, or None.
    """

    def __init__(self, width_divisor: int = 1, pretrained_path: Path | None = None) -> None:
        super().__init__()
        self.encoder = SegNetEncoder(width_divisor, pretrained_path)
        self.decoder = SegNetDecoder(width_divisor)
        channels = self.encoder.out_channels
        self.heads = nn.ModuleList(
            [
                OrientationHead(channels, "fingerprint"),
                SegmentationHead(self.decoder, "fingerprint"),
                OrientationHead(channels, "latent"),
                SegmentationHead(self.decoder, "latent"),
                MatchingHead(),
            ]
        )

    def shared(self, inputs: dict[str, Tensor]) -> dict[str, Encoded]:
        n_pairs = inputs["fingerprint"].shape[0]
        images = torch.cat([inputs["fingerprint"], inputs["latent"]])
        encoded = self.encoder(normalise_images(images))
        return {
            "fingerprint": _select_rows(encoded, slice(0, n_pairs)),
            "latent": _select_rows(encoded, slice(n_pairs, None)),
        }


class OrientationHead(nn.Module):
    """Pattern class logits ``(batch, 6)`` of one image of the pair."""

    def __init__(self, in_channels: int, source: str) -> None:
        super().__init__()
        self.source = source
        self.dense = DenseHead(in_channels, len(FINGERPRINT_CLASSES))

    def forward(self, features: dict[str, Encoded]) -> Tensor:
        return self.dense(features[self.source])


class SegmentationHead(nn.Module):
    """Foreground logits ``(batch, 1, height, width)`` of one image, from the shared decoder."""

    def __init__(self, decoder: SegNetDecoder, source: str) -> None:
        super().__init__()
        self.source = source
        self.decoder = decoder
        self.output = nn.Conv2d(decoder.out_channels, 1, kernel_size=3, padding=1)

    def forward(self, features: dict[str, Encoded]) -> Tensor:
        return self.output(self.decoder(features[self.source]))


class MatchingHead(nn.Module):
    """Euclidean distance ``(batch,)`` between the unit-length embeddings of the pair."""

    def forward(self, features: dict[str, Encoded]) -> Tensor:
        fingerprint = F.normalize(features["fingerprint"].pooled(), dim=1)
        latent = F.normalize(features["latent"].pooled(), dim=1)
        # The small constant keeps the gradient finite for identical embeddings.
        return torch.sqrt(((fingerprint - latent) ** 2).sum(dim=1) + 1e-12)


def _select_rows(encoded: Encoded, rows: slice) -> Encoded:
    return Encoded(
        encoded.features[rows],
        [indices[rows] for indices in encoded.indices],
        encoded.sizes,
    )
