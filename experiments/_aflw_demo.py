"""Generator of a small AFLW-format data set: ``aflw.sqlite`` and drawn faces under ``flickr/``.

The images are cartoon faces drawn with PIL. Each face has a 3D pose (yaw, pitch, roll) that
moves its 21 landmarks, a sex shown by the hair (long for female), optional glasses, and a
face rectangle. The annotations are written to the AFLW tables with the column names of the
AFLW release (see :mod:`experiments._aflw`). Like the real database, the set contains
images with two faces and greyscale images (``FaceImages.bw = 1``). Hidden or left-out
landmarks have no ``FeatureCoords`` row. Some faces have no ``FacePose`` row, and some have
no sex in their metadata or no metadata at all.

NOTE: the column types and the ``FeatureCoordTypes.code`` values are this generator's
choice. The AFLW release's schema file was not available, and the reader uses only the
table and column names.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from experiments._aflw import DATABASE_NAME, IMAGE_FOLDER, LANDMARK_NAMES

_logger = logging.getLogger(__name__)

AFLW_SCHEMA = """
CREATE TABLE Databases (db_id TEXT PRIMARY KEY, path TEXT, description TEXT);
CREATE TABLE AnnotationType (annot_type_id INTEGER PRIMARY KEY, description TEXT, CODE TEXT);
CREATE TABLE FaceImages (
    image_id INTEGER PRIMARY KEY, db_id TEXT, file_id TEXT, filepath TEXT,
    bw INTEGER, width INTEGER, height INTEGER);
CREATE TABLE Faces (face_id INTEGER PRIMARY KEY, file_id TEXT, db_id TEXT);
CREATE TABLE FaceRect (
    face_id INTEGER, x INTEGER, y INTEGER, w INTEGER, h INTEGER, annot_type_id INTEGER);
CREATE TABLE FaceEllipse (
    face_id INTEGER, x REAL, y REAL, ra REAL, rb REAL, theta REAL,
    annot_type_id INTEGER, upsidedown INTEGER);
CREATE TABLE FacePose (face_id INTEGER, roll REAL, pitch REAL, yaw REAL, annot_type_id INTEGER);
CREATE TABLE CamPose (
    face_id INTEGER, camYaw REAL, camPitch REAL, camRoll REAL, annot_type_id INTEGER);
CREATE TABLE FaceMetaData (
    face_id INTEGER, sex TEXT, occluded INTEGER, glasses INTEGER, bw INTEGER,
    annot_type_id INTEGER);
CREATE TABLE FeatureCoordTypes (
    feature_id INTEGER PRIMARY KEY, descr TEXT, code TEXT, x REAL, y REAL, z REAL);
CREATE TABLE FeatureCoords (
    face_id INTEGER, feature_id INTEGER, x REAL, y REAL, annot_type_id INTEGER);
"""
"""DDL of the AFLW tables, with the AFLW release's table and column names."""

# Mean-face positions of the 21 landmarks in head radii: x right, y down, z toward the camera.
_MEAN_FACE = np.array(
    [
        [-0.60, -0.45, 0.75],
        [-0.40, -0.52, 0.85],
        [-0.15, -0.47, 0.95],
        [0.15, -0.47, 0.95],
        [0.40, -0.52, 0.85],
        [0.60, -0.45, 0.75],
        [-0.55, -0.25, 0.80],
        [-0.38, -0.27, 0.88],
        [-0.20, -0.25, 0.92],
        [0.20, -0.25, 0.92],
        [0.38, -0.27, 0.88],
        [0.55, -0.25, 0.80],
        [-0.95, -0.05, 0.00],
        [-0.15, 0.18, 0.95],
        [0.00, 0.22, 1.10],
        [0.15, 0.18, 0.95],
        [0.95, -0.05, 0.00],
        [-0.30, 0.50, 0.85],
        [0.00, 0.48, 0.95],
        [0.30, 0.50, 0.85],
        [0.00, 0.90, 0.60],
    ]
)
_BROWS = ((0, 1, 2), (3, 4, 5))
_EYE_CENTERS = (7, 10)
_EARS = (12, 16)
_NOSE = (13, 14, 15)
_MOUTH = (17, 18, 19)
_FACE_SIZE = 96
_MIN_DEPTH = 0.1


@dataclass
class _Face:
    """One drawn face: its pose, attributes and projected landmarks in canvas pixels."""

    center: tuple[float, float]
    radius: float
    yaw: float
    pitch: float
    roll: float
    female: bool
    glasses: bool
    points: np.ndarray = field(default_factory=lambda: np.zeros((21, 2)))
    visible: np.ndarray = field(default_factory=lambda: np.zeros(21, dtype=bool))


def write_demo_aflw(folder: Path, n_images: int = 80, seed: int = 0) -> Path:
    """Write ``aflw.sqlite`` and ``flickr/{0,2,3}/imageNNNNN.jpg`` under ``folder``.

    Every sixth image contains two faces, so ``n_images`` images contain about
    ``1.17 * n_images`` faces. Returns ``folder``, the ``data_dir`` of the face experiment.
    """
    folder = Path(folder)
    for subfolder in ("0", "2", "3"):
        (folder / IMAGE_FOLDER / subfolder).mkdir(parents=True, exist_ok=True)
    database = folder / DATABASE_NAME
    database.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    connection = sqlite3.connect(database)
    try:
        connection.executescript(AFLW_SCHEMA)
        _write_lookup_tables(connection)
        for image_number in range(1, n_images + 1):
            _write_image(connection, folder, image_number, rng)
        connection.commit()
    finally:
        connection.close()
    _logger.info("wrote a demo AFLW set of %d images to %s", n_images, folder)
    return folder


def _write_lookup_tables(connection: sqlite3.Connection) -> None:
    connection.execute("INSERT INTO Databases VALUES ('flickr', 'flickr/', 'Flickr images')")
    connection.execute("INSERT INTO AnnotationType VALUES (1, 'manual annotation', 'MANUAL')")
    for feature_id, (name, position) in enumerate(
        zip(LANDMARK_NAMES, _MEAN_FACE, strict=True), start=1
    ):
        code = "".join(character for character in name if character.isupper())
        connection.execute(
            "INSERT INTO FeatureCoordTypes VALUES (?, ?, ?, ?, ?, ?)",
            (feature_id, name, code, *position.tolist()),
        )


def _write_image(
    connection: sqlite3.Connection, folder: Path, image_number: int, rng: np.random.Generator
) -> None:
    n_faces = 2 if image_number % 6 == 0 else 1
    width, height = _FACE_SIZE * n_faces, _FACE_SIZE
    faces = [_random_face(rng, offset=index * _FACE_SIZE) for index in range(n_faces)]
    image = _draw_image(width, height, faces, rng)

    greyscale = image_number % 4 == 0
    if greyscale:
        image = image.convert("L")
    file_id = f"image{image_number:05d}.jpg"
    filepath = f"{('0', '2', '3')[image_number % 3]}/{file_id}"
    image.save(folder / IMAGE_FOLDER / filepath, quality=92)
    connection.execute(
        "INSERT INTO FaceImages (db_id, file_id, filepath, bw, width, height)"
        " VALUES ('flickr', ?, ?, ?, ?, ?)",
        (file_id, filepath, int(greyscale), width, height),
    )
    for face in faces:
        _write_face(connection, file_id, face, rng)


def _random_face(rng: np.random.Generator, offset: int) -> _Face:
    face = _Face(
        center=(offset + _FACE_SIZE / 2 + rng.uniform(-6, 6), _FACE_SIZE / 2 + rng.uniform(-6, 6)),
        radius=rng.uniform(24, 32),
        yaw=rng.uniform(-0.6, 0.6),
        pitch=rng.uniform(-0.3, 0.3),
        roll=rng.uniform(-0.3, 0.3),
        female=bool(rng.random() < 0.5),
        glasses=bool(rng.random() < 0.3),
    )
    _project(face)
    return face


def _project(face: _Face) -> None:
    """Rotate the mean face by the pose and project it orthographically onto the canvas."""
    cos_yaw, sin_yaw = np.cos(face.yaw), np.sin(face.yaw)
    cos_pitch, sin_pitch = np.cos(face.pitch), np.sin(face.pitch)
    cos_roll, sin_roll = np.cos(face.roll), np.sin(face.roll)
    yaw = np.array([[cos_yaw, 0, sin_yaw], [0, 1, 0], [-sin_yaw, 0, cos_yaw]])
    pitch = np.array([[1, 0, 0], [0, cos_pitch, -sin_pitch], [0, sin_pitch, cos_pitch]])
    roll = np.array([[cos_roll, -sin_roll, 0], [sin_roll, cos_roll, 0], [0, 0, 1]])
    rotated = _MEAN_FACE @ (roll @ yaw @ pitch).T
    face.points = rotated[:, :2] * face.radius + np.array(face.center)
    face.visible = rotated[:, 2] > _MIN_DEPTH


def _draw_image(
    width: int, height: int, faces: list[_Face], rng: np.random.Generator
) -> Image.Image:
    background = rng.integers(40, 200, size=3)
    blocks = rng.normal(0, 12, size=(height // 8 + 1, width // 8 + 1, 3))
    texture = np.kron(blocks, np.ones((8, 8, 1)))[:height, :width]
    pixels = np.clip(background + texture, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    for face in faces:
        _draw_face(draw, face, rng)
    return image


def _draw_face(draw: ImageDraw.ImageDraw, face: _Face, rng: np.random.Generator) -> None:
    x, y = face.center
    r = face.radius
    hair = tuple(int(value) for value in rng.integers(10, 90, size=3))
    if face.female:
        draw.ellipse((x - 1.2 * r, y - 1.3 * r, x + 1.2 * r, y + 1.4 * r), fill=hair)
    skin = tuple(int(value) for value in rng.integers(150, 240, size=3))
    draw.ellipse((x - 0.95 * r, y - 1.15 * r, x + 0.95 * r, y + 1.0 * r), fill=skin)
    if not face.female:
        draw.chord((x - 0.95 * r, y - 1.2 * r, x + 0.95 * r, y - 0.2 * r), 180, 360, fill=hair)
    _draw_features(draw, face)


def _draw_features(draw: ImageDraw.ImageDraw, face: _Face) -> None:
    r = face.radius
    for brow in _BROWS:
        _draw_polyline(draw, face, brow, fill=(40, 30, 20), width=2)
    for eye in _EYE_CENTERS:
        if face.visible[eye]:
            _draw_circle(draw, face.points[eye], 0.08 * r, fill=(20, 20, 40))
            if face.glasses:
                _draw_circle(draw, face.points[eye], 0.2 * r, outline=(10, 10, 10), width=2)
    if face.glasses and face.visible[list(_EYE_CENTERS)].all():
        left, right = (face.points[eye] for eye in _EYE_CENTERS)
        draw.line((*left, *right), fill=(10, 10, 10), width=1)
    for ear in _EARS:
        if face.visible[ear]:
            _draw_circle(draw, face.points[ear], 0.15 * r, fill=(200, 150, 130))
    _draw_polyline(draw, face, _NOSE, fill=(120, 70, 60), width=2)
    _draw_polyline(draw, face, _MOUTH, fill=(170, 30, 40), width=3)


def _draw_polyline(
    draw: ImageDraw.ImageDraw, face: _Face, indices: tuple[int, ...], fill: tuple, width: int
) -> None:
    points = [tuple(face.points[index]) for index in indices if face.visible[index]]
    if len(points) >= 2:
        draw.line(points, fill=fill, width=width)


def _draw_circle(draw: ImageDraw.ImageDraw, center: np.ndarray, radius: float, **style) -> None:
    x, y = center
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), **style)


def _write_face(
    connection: sqlite3.Connection, file_id: str, face: _Face, rng: np.random.Generator
) -> None:
    cursor = connection.execute(
        "INSERT INTO Faces (file_id, db_id) VALUES (?, 'flickr')", (file_id,)
    )
    face_id = int(cursor.lastrowid or 0)
    x, y = face.center
    side = 2.6 * face.radius
    connection.execute(
        "INSERT INTO FaceRect VALUES (?, ?, ?, ?, ?, 1)",
        (face_id, round(x - side / 2), round(y - side / 2), round(side), round(side)),
    )
    connection.execute(
        "INSERT INTO FaceEllipse VALUES (?, ?, ?, ?, ?, ?, 1, 0)",
        (face_id, x, y, 1.15 * face.radius, 0.95 * face.radius, face.roll),
    )
    if rng.random() >= 0.15:
        connection.execute(
            "INSERT INTO FacePose VALUES (?, ?, ?, ?, 1)",
            (face_id, face.roll, face.pitch, face.yaw),
        )
    _write_metadata(connection, face_id, face, rng)
    _write_landmarks(connection, face_id, face, rng)


def _write_metadata(
    connection: sqlite3.Connection, face_id: int, face: _Face, rng: np.random.Generator
) -> None:
    draw = rng.random()
    if draw < 0.08:
        return
    if draw < 0.18:
        sex = ""
    else:
        sex = "f" if face.female else "m"
    connection.execute(
        "INSERT INTO FaceMetaData VALUES (?, ?, 0, ?, 0, 1)", (face_id, sex, int(face.glasses))
    )


def _write_landmarks(
    connection: sqlite3.Connection, face_id: int, face: _Face, rng: np.random.Generator
) -> None:
    if rng.random() < 0.05:
        return
    for index, (x, y) in enumerate(face.points):
        if face.visible[index] and rng.random() >= 0.1:
            connection.execute(
                "INSERT INTO FeatureCoords VALUES (?, ?, ?, ?, 1)",
                (face_id, index + 1, float(x), float(y)),
            )
