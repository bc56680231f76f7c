"""Reader of the AFLW face database in its own format: ``aflw.sqlite`` and the Flickr images.

AFLW (Annotated Facial Landmarks in the Wild, Koestinger et al., ICCV workshops 2011) ships
its annotations as an SQLite file, ``aflw/data/aflw.sqlite``, beside the images in
``aflw/data/flickr/0``, ``flickr/2`` and ``flickr/3``. This reader uses the table and column
names of the SQL statements in the AFLW distribution's own ``facedbsql`` library, in
``FaceDataByIDsQuery.cpp``, ``FaceData.cpp`` and ``import/flickr_import.cpp``. A copy of that
library is at github.com/hardegg/aflw. The tables:

- ``Faces(face_id, file_id, db_id)``: one row per face; ``file_id`` is the image file name.
- ``FaceImages(image_id, db_id, file_id, filepath, bw, width, height)``: ``filepath`` is
  relative to ``flickr/`` (``0/image00002.jpg``) and ``bw`` is 1 for a greyscale image.
- ``FaceRect(face_id, x, y, w, h, annot_type_id)``: the face rectangle in pixels.
- ``FacePose(face_id, roll, pitch, yaw, annot_type_id)``: head pose in radians.
- ``FeatureCoords(face_id, feature_id, x, y, annot_type_id)``: one row per annotated
  landmark, in image pixels. Landmarks that were not visible have no row.
- ``FeatureCoordTypes(feature_id, descr, code, x, y, z)``: the 21 landmarks, ids 1 to 21,
  with their 3D mean-face position.
- ``FaceMetaData(face_id, sex, occluded, glasses, bw, annot_type_id)``: ``sex`` is ``'m'``,
  ``'f'`` or ``''`` (not annotated) and ``glasses`` is 0 or 1.
- ``FaceEllipse``, ``CamPose``, ``Databases`` and ``AnnotationType``, which this reader
  does not use.

Images are either decoded once into memory at the target size or, for large sets, opened
with PIL each time an item is read. :class:`FaceImages` makes that choice from the ``lazy``
flag its caller passes. The 24,384 faces of the face experiment take about 3.7 GB as
224 by 224 ``uint8`` crops (24,384 * 3 * 224 * 224 bytes), so the full set is read lazily.
"""

from __future__ import annotations

import logging
import sqlite3
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

DATABASE_NAME = "aflw.sqlite"
IMAGE_FOLDER = "flickr"
N_LANDMARKS = 21
FACE_TASKS = ("gender", "spectacles", "landmarks", "pose", "denoising")

LANDMARK_NAMES = (
    "LeftBrowLeftCorner",
    "LeftBrowCenter",
    "LeftBrowRightCorner",
    "RightBrowLeftCorner",
    "RightBrowCenter",
    "RightBrowRightCorner",
    "LeftEyeLeftCorner",
    "LeftEyeCenter",
    "LeftEyeRightCorner",
    "RightEyeLeftCorner",
    "RightEyeCenter",
    "RightEyeRightCorner",
    "LeftEar",
    "NoseLeft",
    "NoseCenter",
    "NoseRight",
    "RightEar",
    "MouthLeftCorner",
    "MouthCenter",
    "MouthRightCorner",
    "ChinCenter",
)
"""``FeatureCoordTypes.descr`` of feature ids 1 to 21, in id order."""

_REQUIRED_TABLES = ("Faces", "FaceImages", "FaceRect", "FacePose", "FeatureCoords")
_METADATA_TABLE = "FaceMetaData"


@dataclass(frozen=True)
class AflwFace:
    """The annotations of one AFLW face.

    Attributes:
        face_id: ``Faces.face_id``.
        image_path: The image file under the data folder.
        rect: Face rectangle ``(x, y, w, h)`` in image pixels.
        landmarks: ``(21, 2)`` landmark positions in image pixels, NaN where not annotated.
        pose: ``(yaw, pitch, roll)`` in radians, or None without a ``FacePose`` row.
        female: True for sex ``'f'``, False for ``'m'``, None when not annotated.
        glasses: The ``FaceMetaData.glasses`` flag, or None without one.
    """

    face_id: int
    image_path: Path
    rect: tuple[float, float, float, float]
    landmarks: np.ndarray
    pose: tuple[float, float, float] | None
    female: bool | None
    glasses: bool | None


def read_aflw(data_dir: Path, max_faces: int | None = None) -> list[AflwFace]:
    """Read the faces of ``data_dir/aflw.sqlite`` that have an image and a face rectangle.

    Faces are returned in ``face_id`` order, the first ``max_faces`` of them when given. A
    face with several rectangles uses the one with the lowest ``annot_type_id``. Image files
    are checked for existence here and decoded later.

    Raises:
        UsageError: The database or an image is missing, the file is not an SQLite
            database, or a table that the reader needs is absent.
    """
    database = Path(data_dir) / DATABASE_NAME
    if not database.is_file():
        raise UsageError(
            f"AFLW annotation database not found at {database}; give as data_dir the folder"
            f" that contains {DATABASE_NAME} and {IMAGE_FOLDER}/ (aflw/data in the AFLW release)"
        )
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        tables = _table_names(connection, database)
        faces = _read_faces(connection, Path(data_dir), tables)
    except sqlite3.Error as error:
        raise UsageError(f"cannot read the AFLW database {database}: {error}") from error
    finally:
        connection.close()
    if max_faces is not None:
        faces = faces[:max_faces]
    _check_images_exist(faces)
    _logger.info("read %d AFLW faces from %s", len(faces), database)
    return faces


def _table_names(connection: sqlite3.Connection, database: Path) -> set[str]:
    """Return the lower-case table names, raising UsageError when a needed table is missing."""
    try:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {name.lower() for (name,) in rows}
    except sqlite3.DatabaseError as error:
        raise UsageError(
            f"{database} is not an SQLite database ({error}); use the aflw.sqlite file of"
            " the AFLW release"
        ) from error
    missing = [name for name in _REQUIRED_TABLES if name.lower() not in tables]
    if missing:
        raise UsageError(
            f"{database} has no table {missing[0]}; it is not an AFLW annotation database"
            f" (expected tables {', '.join(_REQUIRED_TABLES)} and {_METADATA_TABLE})"
        )
    return tables


def _read_faces(
    connection: sqlite3.Connection, data_dir: Path, tables: set[str]
) -> list[AflwFace]:
    images = connection.execute(
        "SELECT Faces.face_id, FaceImages.filepath FROM Faces JOIN FaceImages"
        " ON Faces.file_id = FaceImages.file_id AND Faces.db_id = FaceImages.db_id"
        " ORDER BY Faces.face_id"
    ).fetchall()
    rects = _first_rows(
        connection, "SELECT face_id, x, y, w, h FROM FaceRect ORDER BY face_id, annot_type_id"
    )
    poses = _first_rows(
        connection, "SELECT face_id, yaw, pitch, roll FROM FacePose ORDER BY face_id, rowid"
    )
    metadata = {}
    if _METADATA_TABLE.lower() in tables:
        metadata = _first_rows(
            connection,
            f"SELECT face_id, sex, glasses FROM {_METADATA_TABLE} ORDER BY face_id, rowid",
        )
    landmarks = _read_landmarks(connection)

    faces = []
    n_without_rect = 0
    for face_id, filepath in images:
        rect = rects.get(face_id)
        if rect is None or not (rect[2] and rect[3] and rect[2] > 0 and rect[3] > 0):
            n_without_rect += 1
            continue
        faces.append(
            AflwFace(
                face_id=face_id,
                image_path=data_dir / IMAGE_FOLDER / filepath,
                rect=tuple(float(value) for value in rect),  # type: ignore[arg-type]
                landmarks=landmarks.get(face_id, _missing_landmarks()),
                pose=_pose(poses.get(face_id)),
                female=_female(metadata.get(face_id)),
                glasses=_glasses(metadata.get(face_id)),
            )
        )
    if n_without_rect:
        _logger.warning("skipped %d AFLW faces without a valid FaceRect row", n_without_rect)
    return faces


def _first_rows(connection: sqlite3.Connection, query: str) -> dict[int, tuple]:
    """Return the remaining columns of the first row of each ``face_id`` (the first column)."""
    rows: dict[int, tuple] = {}
    for face_id, *values in connection.execute(query):
        rows.setdefault(face_id, tuple(values))
    return rows


def _read_landmarks(connection: sqlite3.Connection) -> dict[int, np.ndarray]:
    landmarks: dict[int, np.ndarray] = {}
    query = (
        "SELECT face_id, feature_id, x, y FROM FeatureCoords"
        f" WHERE feature_id BETWEEN 1 AND {N_LANDMARKS}"
    )
    for face_id, feature_id, x, y in connection.execute(query):
        if x is None or y is None:
            continue
        points = landmarks.setdefault(face_id, _missing_landmarks())
        points[feature_id - 1] = (x, y)
    return landmarks


def _missing_landmarks() -> np.ndarray:
    return np.full((N_LANDMARKS, 2), np.nan, dtype=np.float32)


def _pose(row: tuple | None) -> tuple[float, float, float] | None:
    if row is None or any(value is None for value in row):
        return None
    return float(row[0]), float(row[1]), float(row[2])


def _female(row: tuple | None) -> bool | None:
    sex = None if row is None or row[0] is None else str(row[0]).strip().lower()
    return {"f": True, "m": False}.get(sex or "")


def _glasses(row: tuple | None) -> bool | None:
    if row is None or row[1] is None:
        return None
    return bool(row[1])


def _check_images_exist(faces: Sequence[AflwFace]) -> None:
    for face in faces:
        if not face.image_path.is_file():
            raise UsageError(
                f"image {face.image_path} of AFLW face {face.face_id} not found; unpack the"
                f" AFLW images into {face.image_path.parents[1]} (flickr/0, flickr/2, flickr/3)"
            )


def crop_face(face: AflwFace, size: int) -> Tensor:
    """Decode the image of ``face``, crop its rectangle and resize it to ``size`` pixels.

    Greyscale images become three equal channels. Parts of the rectangle outside the image
    are black. Returns a ``uint8`` tensor ``(3, size, size)``.

    Raises:
        UsageError: The image file cannot be decoded.
    """
    x, y, w, h = face.rect
    try:
        with Image.open(face.image_path) as image:
            crop = image.convert("RGB").crop((x, y, x + w, y + h))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise UsageError(
            f"cannot decode image {face.image_path} of AFLW face {face.face_id}: {error};"
            " replace the file with the one from the AFLW release"
        ) from error
    crop = crop.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)


def landmark_targets(faces: Sequence[AflwFace]) -> Tensor:
    """Return ``(n_faces, 21, 3)``: landmarks in face-rectangle units, then 1 where present.

    A coordinate of 0 is the left or top edge of the rectangle and 1 the right or bottom edge,
    so the crop's resize does not change the targets.
    """
    targets = torch.zeros(len(faces), N_LANDMARKS, 3)
    for index, face in enumerate(faces):
        x, y, w, h = face.rect
        points = torch.from_numpy(face.landmarks)
        present = ~torch.isnan(points).any(dim=1)
        normalised = (points - torch.tensor([x, y])) / torch.tensor([w, h])
        targets[index, :, :2] = torch.where(present[:, None], normalised, 0.0)
        targets[index, :, 2] = present.float()
    return targets


def add_speckle(image: Tensor, fraction: float, std: float, generator: torch.Generator) -> Tensor:
    """Return ``image`` with speckle noise on a random ``fraction`` of its pixels.

    Speckle noise is multiplicative: a chosen pixel becomes ``v * (1 + n)`` with ``n`` drawn
    from a normal distribution of standard deviation ``std`` per channel, clipped to [0, 1].
    ``image`` contains floats in [0, 1] with shape ``(channels, height, width)``.
    """
    _, height, width = image.shape
    chosen = torch.rand(1, height, width, generator=generator) < fraction
    noise = torch.randn(image.shape, generator=generator) * std
    return (image + image * noise * chosen).clamp(0.0, 1.0)


class FaceImages:
    """The face crops of a list of faces, decoded into memory at once or read per item.

    Args:
        faces: The faces, in item order.
        size: Side of the square crops in pixels.
        lazy: Whether to decode each image when it is read (for large sets) instead of
            decoding all of them now.
    """

    def __init__(self, faces: Sequence[AflwFace], size: int, lazy: bool) -> None:
        self.faces = list(faces)
        self.size = size
        self.lazy = lazy
        self._crops: Tensor | None = None
        if not lazy:
            self._crops = self._decode_all()

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> Tensor:
        """Return crop ``index`` as a ``uint8`` tensor ``(3, size, size)``."""
        if self._crops is not None:
            return self._crops[index]
        return crop_face(self.faces[index], self.size)

    def _decode_all(self) -> Tensor:
        crops = torch.empty(len(self.faces), 3, self.size, self.size, dtype=torch.uint8)
        progress = tqdm(
            self.faces, desc="decoding AFLW faces", unit="face", leave=False, file=sys.stderr
        )
        for index, face in enumerate(progress):
            crops[index] = crop_face(face, self.size)
        return crops


class FaceDataset(Dataset):
    """AFLW items ``(noisy crop, targets, mask)`` for the five face tasks.

    The targets are, in task order: gender (1.0 for female), spectacles (1.0 with glasses),
    the landmarks ``(21, 3)`` of :func:`landmark_targets`, the pose ``(yaw, pitch, roll)`` and
    the clean crop for denoising. The input is the clean crop with speckle noise. The noise
    of a face is drawn from a generator seeded with ``noise_seed`` and the face id, so every
    read of a face, in any split, returns the same noisy image.

    Args:
        images: The face crops.
        indices: Positions in ``images`` of this split's faces.
        labelled: Bool ``(len(indices), 5)``, true where a face is labelled for a task.
        noise_fraction: Fraction of the pixels that get speckle noise.
        noise_std: Standard deviation of the multiplicative speckle noise.
        noise_seed: Seed of the noise.
    """

    def __init__(
        self,
        images: FaceImages,
        indices: Sequence[int],
        labelled: Tensor,
        noise_fraction: float,
        noise_std: float,
        noise_seed: int,
    ) -> None:
        faces = [images.faces[index] for index in indices]
        self.images = images
        self.indices = list(indices)
        self.labelled = labelled.bool()
        self.noise_fraction = noise_fraction
        self.noise_std = noise_std
        self.noise_seed = noise_seed
        self.gender = torch.tensor([float(face.female or False) for face in faces])
        self.spectacles = torch.tensor([float(face.glasses or False) for face in faces])
        self.landmarks = landmark_targets(faces)
        self.pose = torch.tensor([face.pose or (0.0, 0.0, 0.0) for face in faces]).reshape(-1, 3)
        self.face_ids = [face.face_id for face in faces]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        clean = self.images[self.indices[index]].float() / 255.0
        generator = torch.Generator().manual_seed(
            self.noise_seed * 1_000_003 + self.face_ids[index]
        )
        noisy = add_speckle(clean, self.noise_fraction, self.noise_std, generator)
        targets = (
            self.gender[index],
            self.spectacles[index],
            self.landmarks[index],
            self.pose[index],
            clean,
        )
        return noisy, targets, self.labelled[index]

    @property
    def n_labelled(self) -> list[int]:
        """Number of labelled faces of each task."""
        return self.labelled.sum(dim=0).tolist()


def available_labels(faces: Sequence[AflwFace]) -> Tensor:
    """Return bool ``(n_faces, 5)``: which task labels each face's annotations provide.

    A face has a landmarks label when at least one of its 21 landmarks is annotated. Every
    face has a denoising label.
    """
    rows = [
        (
            face.female is not None,
            face.glasses is not None,
            bool((~np.isnan(face.landmarks).any(axis=1)).any()),
            face.pose is not None,
            True,
        )
        for face in faces
    ]
    return torch.tensor(rows, dtype=torch.bool).reshape(-1, len(FACE_TASKS))


def draw_labelled_fractions(
    available: Tensor, fractions: Sequence[float], generator: torch.Generator
) -> Tensor:
    """Keep, per task, labels on ``round(fraction * n_faces)`` random faces that have one.

    The count is relative to all faces of the split, as in the face experiment of Malhotra
    et al. (TMLR 2022): 50 % of the 17,000 training faces keep a gender label, and so on. When
    fewer faces have the label, all of them keep it.
    """
    n_faces = available.shape[0]
    labelled = torch.zeros_like(available)
    for task, fraction in enumerate(fractions):
        candidates = available[:, task].nonzero().squeeze(1)
        n_kept = min(round(fraction * n_faces), len(candidates))
        order = torch.randperm(len(candidates), generator=generator)
        labelled[candidates[order[:n_kept]], task] = True
    return labelled


def split_faces(
    n_faces: int, test_fraction: float, validation_fraction: float, split_seed: int, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Return ``(train, validation, test)`` face positions.

    The test split is fixed by ``split_seed`` so that every run seed is scored on the same
    faces. ``seed`` draws the validation faces out of the rest.
    """
    n_test = round(test_fraction * n_faces)
    order = torch.randperm(n_faces, generator=torch.Generator().manual_seed(split_seed))
    test, rest = order[:n_test], order[n_test:]
    n_validation = max(1, round(validation_fraction * len(rest)))
    if n_test < 1 or n_validation >= len(rest):
        raise UsageError(
            f"{n_faces} faces are too few for a test fraction of {test_fraction} and a"
            f" validation fraction of {validation_fraction}; use more faces (max_faces) or"
            " smaller fractions"
        )
    shuffled = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
    validation, train = shuffled[:n_validation], shuffled[n_validation:]
    return sorted(train.tolist()), sorted(validation.tolist()), sorted(test.tolist())
