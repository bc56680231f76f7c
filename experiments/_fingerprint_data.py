"""Reader of fingerprint and latent fingerprint pairs listed in a CSV manifest.

The manifest (``pairs.csv`` by default) has one row per pair, with a header. Paths are
relative to the manifest's folder, or absolute:

| column | required | value |
|---|---|---|
| ``fingerprint`` | yes | image of the full fingerprint |
| ``latent`` | yes | image of the latent fingerprint |
| ``match`` | yes | 1 when both come from the same finger, 0 when not, empty when unknown |
| ``fingerprint_class``, ``latent_class`` | no | pattern class of each image, or empty |
| ``fingerprint_mask``, ``latent_mask`` | no | foreground mask image (white on black), or empty |
| ``split`` | no | ``train`` or ``test`` for every row; without it the split is drawn |

The pattern classes are ``whorl``, ``arch``, ``tented_arch``, ``left_loop``,
``right_loop`` and ``twin_loop`` (case, spaces and hyphens do not matter). Images are read as
RGB and resized to the experiment's size; masks are resized with nearest-neighbour sampling
and a pixel above 127 is foreground.

The images of a small set are decoded once into memory. A large set decodes each pair with
PIL when it is read, and the caller chooses which through :class:`PairImages`.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dst._errors import UsageError

_logger = logging.getLogger(__name__)

MANIFEST_NAME = "pairs.csv"
FINGERPRINT_CLASSES = ("whorl", "arch", "tented_arch", "left_loop", "right_loop", "twin_loop")
FINGERPRINT_TASKS = (
    "fingerprint_orientation",
    "fingerprint_segmentation",
    "latent_orientation",
    "latent_segmentation",
    "matching",
)
REQUIRED_COLUMNS = ("fingerprint", "latent", "match")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class FingerprintPair:
    """One manifest row.

    Attributes:
        line: Line number of the row in the manifest, for messages.
        fingerprint: Image of the full fingerprint.
        latent: Image of the latent fingerprint.
        match: Whether both come from the same finger, None when unknown.
        fingerprint_class: Index in ``FINGERPRINT_CLASSES``, None when unknown.
        latent_class: Index in ``FINGERPRINT_CLASSES``, None when unknown.
        fingerprint_mask: Foreground mask of the fingerprint, or None.
        latent_mask: Foreground mask of the latent, or None.
        split: ``"train"``, ``"test"`` or None when the manifest has no split column.
    """

    line: int
    fingerprint: Path
    latent: Path
    match: bool | None
    fingerprint_class: int | None
    latent_class: int | None
    fingerprint_mask: Path | None
    latent_mask: Path | None
    split: str | None


def read_manifest(path: Path, max_pairs: int | None = None) -> list[FingerprintPair]:
    """Read and check the pairs of the manifest at ``path``, the first ``max_pairs`` if given.

    Raises:
        UsageError: The manifest or a file it lists is missing, a column is missing, or a
            value is invalid. The message names the line.
    """
    if not path.is_file():
        raise UsageError(
            f"fingerprint manifest not found at {path}; give data_dir the folder that contains"
            f" it, or set the manifest option to its file name"
        )
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        columns = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise UsageError(
                f"manifest {path} has no column {missing[0]!r}; its header must name at"
                f" least {', '.join(REQUIRED_COLUMNS)}"
            )
        pairs: list[FingerprintPair] = []
        for line, row in enumerate(reader, start=2):
            if max_pairs is not None and len(pairs) >= max_pairs:
                break
            cells = {key.strip(): (value or "").strip() for key, value in row.items() if key}
            pairs.append(_parse_row(cells, line, path))
    if not pairs:
        raise UsageError(f"manifest {path} lists no pairs; add one row per pair below the header")
    _check_splits(pairs, path)
    _logger.info("read %d fingerprint pairs from %s", len(pairs), path)
    return pairs


def _parse_row(cells: dict[str, str], line: int, manifest: Path) -> FingerprintPair:
    folder = manifest.parent

    def file(column: str, required: bool) -> Path | None:
        value = cells.get(column, "")
        if not value:
            if required:
                raise UsageError(
                    f"{manifest} line {line}: column {column!r} is empty; give a path"
                )
            return None
        resolved = folder / value
        if not resolved.is_file():
            raise UsageError(
                f"{manifest} line {line}: {column} file {resolved} not found; fix the path"
                " (relative to the manifest's folder)"
            )
        return resolved

    return FingerprintPair(
        line=line,
        fingerprint=file("fingerprint", required=True),  # type: ignore[arg-type]
        latent=file("latent", required=True),  # type: ignore[arg-type]
        match=_parse_match(cells.get("match", ""), line, manifest),
        fingerprint_class=parse_class(cells.get("fingerprint_class", ""), line, manifest),
        latent_class=parse_class(cells.get("latent_class", ""), line, manifest),
        fingerprint_mask=file("fingerprint_mask", required=False),
        latent_mask=file("latent_mask", required=False),
        split=_parse_split(cells.get("split", ""), line, manifest),
    )


def _parse_match(value: str, line: int, manifest: Path) -> bool | None:
    if value == "":
        return None
    if value not in ("0", "1"):
        raise UsageError(
            f"{manifest} line {line}: invalid match {value!r}; use 1 for the same finger,"
            " 0 for different fingers, or leave it empty"
        )
    return value == "1"


def parse_class(value: str, line: int, manifest: Path) -> int | None:
    """Return the class index of a pattern name, None for an empty cell."""
    if value == "":
        return None
    name = value.lower().replace("-", "_").replace(" ", "_")
    if name not in FINGERPRINT_CLASSES:
        raise UsageError(
            f"{manifest} line {line}: unknown fingerprint class {value!r}; use one of"
            f" {', '.join(FINGERPRINT_CLASSES)} or leave it empty"
        )
    return FINGERPRINT_CLASSES.index(name)


def _parse_split(value: str, line: int, manifest: Path) -> str | None:
    if value == "":
        return None
    if value.lower() not in SPLITS:
        raise UsageError(f"{manifest} line {line}: invalid split {value!r}; use train or test")
    return value.lower()


def _check_splits(pairs: Sequence[FingerprintPair], manifest: Path) -> None:
    rows_with_split = [pair for pair in pairs if pair.split is not None]
    if rows_with_split and len(rows_with_split) < len(pairs):
        line = next(pair.line for pair in pairs if pair.split is None)
        raise UsageError(
            f"{manifest} line {line}: split is empty while other rows have one; give train"
            " or test on every row, or drop the split column to draw the split"
        )


def load_image(path: Path, size: tuple[int, int]) -> Tensor:
    """Decode ``path`` as RGB resized to ``size`` (height, width); ``uint8`` ``(3, h, w)``."""
    image = _open(path).convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_mask(path: Path, size: tuple[int, int]) -> Tensor:
    """Decode the mask ``path`` resized to ``size``; ``uint8`` ``(1, h, w)`` of 0 and 1."""
    mask = _open(path).convert("L").resize(size[::-1], Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 127).to(torch.uint8)[None]


def _open(path: Path) -> Image.Image:
    """Return the fully decoded image at ``path``, raising UsageError when it is unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise UsageError(
            f"cannot decode image {path}: {error}; replace the file or remove its row from"
            " the manifest"
        ) from error


class PairImages:
    """The images and masks of a list of pairs, decoded into memory at once or per item.

    A pair without a mask gets an all-background placeholder.

    Args:
        pairs: The pairs, in item order.
        size: ``(height, width)`` of every image and mask.
        lazy: Whether to decode each pair when it is read (for large sets) instead of
            decoding all of them now.
    """

    def __init__(
        self, pairs: Sequence[FingerprintPair], size: tuple[int, int], lazy: bool
    ) -> None:
        self.pairs = list(pairs)
        self.size = size
        self.lazy = lazy
        self._decoded: list[tuple[Tensor, ...]] | None = None
        if not lazy:
            progress = tqdm(
                self.pairs, desc="decoding fingerprint pairs", unit="pair", leave=False,
                file=sys.stderr,
            )  # fmt: skip
            self._decoded = [self._decode(pair) for pair in progress]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        """Return ``(fingerprint, latent, fingerprint_mask, latent_mask)`` as ``uint8``."""
        if self._decoded is not None:
            return self._decoded[index]
        return self._decode(self.pairs[index])

    def _decode(self, pair: FingerprintPair) -> tuple[Tensor, ...]:
        return (
            load_image(pair.fingerprint, self.size),
            load_image(pair.latent, self.size),
            self._mask(pair.fingerprint_mask),
            self._mask(pair.latent_mask),
        )

    def _mask(self, path: Path | None) -> Tensor:
        if path is None:
            return torch.zeros(1, *self.size, dtype=torch.uint8)
        return load_mask(path, self.size)


def available_labels(pairs: Sequence[FingerprintPair]) -> Tensor:
    """Return bool ``(n_pairs, 5)``: which of the five task labels each pair provides."""
    rows = [
        (
            pair.fingerprint_class is not None,
            pair.fingerprint_mask is not None,
            pair.latent_class is not None,
            pair.latent_mask is not None,
            pair.match is not None,
        )
        for pair in pairs
    ]
    return torch.tensor(rows, dtype=torch.bool).reshape(-1, len(FINGERPRINT_TASKS))


class FingerprintDataset(Dataset):
    """Items ``({"fingerprint", "latent"}, targets, mask)`` for the five fingerprint tasks.

    The targets are, in task order: the fingerprint's class index, its mask ``(1, h, w)``,
    the latent's class index, its mask, and the match label (1.0 for the same finger).
    Images are floats in [0, 1]. Unknown labels carry a class 0, an empty mask or a match
    of 0 as placeholder.

    Args:
        images: The decoded pairs.
        indices: Positions in ``images`` of this split's pairs.
        labelled: Bool ``(len(indices), 5)``, true where a pair is labelled for a task.
    """

    def __init__(self, images: PairImages, indices: Sequence[int], labelled: Tensor) -> None:
        pairs = [images.pairs[index] for index in indices]
        self.images = images
        self.indices = list(indices)
        self.labelled = labelled.bool()
        self.fingerprint_class = torch.tensor([pair.fingerprint_class or 0 for pair in pairs])
        self.latent_class = torch.tensor([pair.latent_class or 0 for pair in pairs])
        self.match = torch.tensor([float(pair.match or False) for pair in pairs])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], tuple[Tensor, ...], Tensor]:
        fingerprint, latent, fingerprint_mask, latent_mask = self.images[self.indices[index]]
        inputs = {"fingerprint": fingerprint.float() / 255.0, "latent": latent.float() / 255.0}
        targets = (
            self.fingerprint_class[index],
            fingerprint_mask.float(),
            self.latent_class[index],
            latent_mask.float(),
            self.match[index],
        )
        return inputs, targets, self.labelled[index]

    @property
    def n_labelled(self) -> list[int]:
        """Number of labelled pairs of each task."""
        return self.labelled.sum(dim=0).tolist()


def split_pairs(
    pairs: Sequence[FingerprintPair],
    test_fraction: float,
    validation_fraction: float,
    split_seed: int,
    seed: int,
) -> tuple[list[int], list[int], list[int]]:
    """Return ``(train, validation, test)`` pair positions.

    The manifest's ``split`` column decides the test pairs when present. Otherwise they are
    drawn with ``split_seed``, so every run seed is scored on the same pairs. ``seed`` draws
    the validation pairs out of the training pairs.
    """
    n_pairs = len(pairs)
    if pairs[0].split is not None:
        test = torch.tensor([i for i, pair in enumerate(pairs) if pair.split == "test"])
        rest = torch.tensor([i for i, pair in enumerate(pairs) if pair.split == "train"])
    else:
        order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(split_seed))
        n_test = round(test_fraction * n_pairs)
        test, rest = order[:n_test], order[n_test:]
    n_validation = max(1, round(validation_fraction * len(rest)))
    if len(test) < 1 or n_validation >= len(rest):
        raise UsageError(
            f"{n_pairs} pairs ({len(rest)} for training, {len(test)} for test) are too few"
            f" for a validation fraction of {validation_fraction}; add pairs or lower the"
            " fractions"
        )
    shuffled = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
    validation, train = shuffled[:n_validation], shuffled[n_validation:]
    return sorted(train.tolist()), sorted(validation.tolist()), sorted(test.tolist())
