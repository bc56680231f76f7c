"""Tests of the AFLW reader, the face data set and model, and ``dst train --experiment face``."""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image

from dst import Task, UsageError
from dst._study_file import load_study_file
from dst.cli import main
from experiments._aflw import (
    FACE_TASKS,
    FaceImages,
    available_labels,
    crop_face,
    draw_labelled_fractions,
    landmark_targets,
    read_aflw,
    split_faces,
)
from experiments._aflw_demo import write_demo_aflw
from experiments.face import FaceExperiment, FaceModel, face_tasks, parse_fractions

if TYPE_CHECKING:
    from conftest import MlflowServer

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "face"
STUDY_NAME = f"table9-{EXPERIMENT}"
STUDY_FILE = REPO / "studies" / f"{STUDY_NAME}.toml"
SMALL_OPTIONS = ("--option", "image_size=32")


# The AFLW tables as the AFLW release names them, written by hand in the column order of its
# SQL statements, independent of the demo generator's DDL.
FIXTURE_SCHEMA = """
CREATE TABLE Faces (face_id INTEGER PRIMARY KEY, file_id TEXT, db_id TEXT);
CREATE TABLE FaceImages (image_id INTEGER PRIMARY KEY, db_id TEXT, file_id TEXT,
    filepath TEXT, bw INTEGER, width INTEGER, height INTEGER);
CREATE TABLE FaceRect (face_id INTEGER, x INTEGER, y INTEGER, w INTEGER, h INTEGER,
    annot_type_id INTEGER);
CREATE TABLE FacePose (face_id INTEGER, roll REAL, pitch REAL, yaw REAL, annot_type_id INTEGER);
CREATE TABLE FeatureCoords (face_id INTEGER, feature_id INTEGER, x REAL, y REAL,
    annot_type_id INTEGER);
CREATE TABLE FeatureCoordTypes (feature_id INTEGER PRIMARY KEY, descr TEXT, code TEXT,
    x REAL, y REAL, z REAL);
CREATE TABLE FaceMetaData (face_id INTEGER, sex TEXT, occluded INTEGER, glasses INTEGER,
    bw INTEGER, annot_type_id INTEGER);
CREATE TABLE FaceEllipse (face_id INTEGER, x REAL, y REAL, ra REAL, rb REAL, theta REAL,
    annot_type_id INTEGER, upsidedown INTEGER);
CREATE TABLE Databases (db_id TEXT, path TEXT, description TEXT);
"""

RED, BLUE = (200, 0, 0), (0, 0, 200)


def write_fixture(folder: Path) -> Path:
    """Write five hand-annotated faces in four images under ``folder``.

    - face 1 (``0/image00001.jpg``, RGB, red left half, blue right half): rectangle over the
      blue half, landmarks 1 to 3 only, pose, male without glasses;
    - face 2 (``2/image00002.jpg``, greyscale 100): no FacePose row, female with glasses;
    - faces 3 and 4 (``3/image00003.jpg``, two faces): face 3 has sex '' and glasses 0.
      Face 4 has no FaceMetaData row and two rectangles, of which the one with the lower
      annot_type_id is the face;
    - face 5 (``0/image00004.jpg``): no FeatureCoords rows.
    """
    for subfolder in ("0", "2", "3"):
        (folder / "flickr" / subfolder).mkdir(parents=True)
    halves = np.zeros((40, 80, 3), dtype=np.uint8)
    halves[:, :40] = RED
    halves[:, 40:] = BLUE
    Image.fromarray(halves).save(folder / "flickr/0/image00001.jpg", quality=100)
    Image.new("L", (60, 60), 100).save(folder / "flickr/2/image00002.jpg", quality=100)
    Image.new("RGB", (120, 60), (0, 150, 0)).save(folder / "flickr/3/image00003.jpg")
    Image.new("RGB", (50, 50), (90, 90, 90)).save(folder / "flickr/0/image00004.jpg")

    connection = sqlite3.connect(folder / "aflw.sqlite")
    connection.executescript(FIXTURE_SCHEMA)
    images = [
        (1, "flickr", "image00001.jpg", "0/image00001.jpg", 0, 80, 40),
        (2, "flickr", "image00002.jpg", "2/image00002.jpg", 1, 60, 60),
        (3, "flickr", "image00003.jpg", "3/image00003.jpg", 0, 120, 60),
        (4, "flickr", "image00004.jpg", "0/image00004.jpg", 0, 50, 50),
    ]
    connection.executemany("INSERT INTO FaceImages VALUES (?, ?, ?, ?, ?, ?, ?)", images)
    faces = [
        (1, "image00001.jpg"),
        (2, "image00002.jpg"),
        (3, "image00003.jpg"),
        (4, "image00003.jpg"),
        (5, "image00004.jpg"),
    ]
    connection.executemany("INSERT INTO Faces VALUES (?, ?, 'flickr')", faces)
    rects = [
        (1, 40, 0, 40, 40, 1),
        (2, 10, 10, 40, 40, 1),
        (3, 0, 0, 60, 60, 1),
        (4, 0, 0, 10, 10, 2),
        (4, 60, 0, 60, 60, 1),
        (5, 5, 5, 40, 40, 1),
    ]
    connection.executemany("INSERT INTO FaceRect VALUES (?, ?, ?, ?, ?, ?)", rects)
    poses = [(1, 0.1, -0.2, 0.3), (3, 0.0, 0.0, -0.5), (4, 0.2, 0.1, 0.0), (5, 0, 0, 0)]
    connection.executemany("INSERT INTO FacePose VALUES (?, ?, ?, ?, 1)", poses)
    metadata = [(1, "m", 0), (2, "f", 1), (3, "", 0), (5, "f", 0)]
    connection.executemany("INSERT INTO FaceMetaData VALUES (?, ?, 0, ?, 0, 1)", metadata)
    coords = [
        (1, 1, 60.0, 10.0),
        (1, 2, 50.0, 20.0),
        (1, 3, 70.0, 30.0),
        (2, 15, 30.0, 30.0),
        (3, 21, 30.0, 50.0),
        (4, 8, 75.0, 15.0),
    ]
    connection.executemany("INSERT INTO FeatureCoords VALUES (?, ?, ?, ?, 1)", coords)
    connection.commit()
    connection.close()
    return folder


@pytest.fixture
def aflw_fixture(tmp_path: Path) -> Path:
    return write_fixture(tmp_path / "aflw")


def test_reader_returns_faces_with_image_paths(aflw_fixture: Path) -> None:
    faces = read_aflw(aflw_fixture)

    assert [face.face_id for face in faces] == [1, 2, 3, 4, 5]
    assert faces[0].image_path == aflw_fixture / "flickr/0/image00001.jpg"
    assert faces[2].image_path == faces[3].image_path == aflw_fixture / "flickr/3/image00003.jpg"


def test_reader_marks_missing_landmarks_as_nan(aflw_fixture: Path) -> None:
    face = read_aflw(aflw_fixture)[0]

    present = ~np.isnan(face.landmarks).any(axis=1)
    assert present.tolist() == [True] * 3 + [False] * 18
    assert face.landmarks[:3].tolist() == [[60, 10], [50, 20], [70, 30]]


def test_reader_maps_landmark_ids_to_positions(aflw_fixture: Path) -> None:
    faces = read_aflw(aflw_fixture)

    assert faces[1].landmarks[14].tolist() == [30, 30]
    assert faces[2].landmarks[20].tolist() == [30, 50]
    assert np.isnan(faces[4].landmarks).all()


def test_pose_in_yaw_pitch_roll_order(aflw_fixture: Path) -> None:
    faces = read_aflw(aflw_fixture)

    assert faces[0].pose == pytest.approx((0.3, -0.2, 0.1))
    assert faces[1].pose is None


def test_reader_reads_sex_and_glasses(aflw_fixture: Path) -> None:
    faces = read_aflw(aflw_fixture)

    assert [face.female for face in faces] == [False, True, None, None, True]
    assert [face.glasses for face in faces] == [False, True, False, None, False]


def test_rectangle_of_lowest_annotation_type(aflw_fixture: Path) -> None:
    face = read_aflw(aflw_fixture)[3]

    assert face.rect == (60, 0, 60, 60)


def test_available_labels_follow_annotations(aflw_fixture: Path) -> None:
    labels = available_labels(read_aflw(aflw_fixture))

    expected = [
        [True, True, True, True, True],
        [True, True, True, False, True],
        [False, True, True, True, True],
        [False, False, True, True, True],
        [True, True, False, True, True],
    ]
    assert labels.tolist() == expected


def test_crop_takes_face_rectangle(aflw_fixture: Path) -> None:
    crop = crop_face(read_aflw(aflw_fixture)[0], size=16)

    assert crop.shape == (3, 16, 16)
    assert crop.dtype == torch.uint8
    mean_colour = crop.float().mean(dim=(1, 2))
    assert mean_colour.tolist() == pytest.approx(BLUE, abs=12)


def test_greyscale_crop_has_equal_channels(aflw_fixture: Path) -> None:
    crop = crop_face(read_aflw(aflw_fixture)[1], size=16)

    assert crop.shape == (3, 16, 16)
    assert torch.equal(crop[0], crop[1])
    assert torch.equal(crop[1], crop[2])
    assert crop.float().mean().item() == pytest.approx(100, abs=3)


def test_landmark_targets_are_in_rectangle_units(aflw_fixture: Path) -> None:
    targets = landmark_targets(read_aflw(aflw_fixture))

    assert targets.shape == (5, 21, 3)
    # Face 1: rectangle (40, 0, 40, 40); landmark 1 at (60, 10).
    assert targets[0, 0].tolist() == pytest.approx([0.5, 0.25, 1.0])
    assert targets[0, 3].tolist() == [0.0, 0.0, 0.0]
    # Face 4: rectangle (60, 0, 60, 60); landmark 8 at (75, 15).
    assert targets[3, 7].tolist() == pytest.approx([0.25, 0.25, 1.0])


def test_corrupt_image_names_file(aflw_fixture: Path) -> None:
    corrupt = aflw_fixture / "flickr/2/image00002.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    faces = read_aflw(aflw_fixture)

    with pytest.raises(UsageError, match="image00002.jpg"):
        FaceImages(faces, size=16, lazy=False)


def test_corrupt_image_fails_lazy_item(aflw_fixture: Path) -> None:
    corrupt = aflw_fixture / "flickr/0/image00004.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    images = FaceImages(read_aflw(aflw_fixture), size=16, lazy=True)

    assert images[0].shape == (3, 16, 16)
    with pytest.raises(UsageError, match=r"image00004\.jpg of AFLW face 5"):
        images[4]


def test_missing_image_names_file(aflw_fixture: Path) -> None:
    (aflw_fixture / "flickr/3/image00003.jpg").unlink()

    with pytest.raises(UsageError, match=r"flickr/3/image00003\.jpg .*not found"):
        read_aflw(aflw_fixture)


def test_missing_database_raises_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="aflw.sqlite not found|not found at"):
        read_aflw(tmp_path)


def test_database_without_table_is_rejected(aflw_fixture: Path) -> None:
    connection = sqlite3.connect(aflw_fixture / "aflw.sqlite")
    connection.execute("DROP TABLE FaceRect")
    connection.commit()
    connection.close()

    with pytest.raises(UsageError, match="no table FaceRect"):
        read_aflw(aflw_fixture)


def test_text_file_database_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "aflw.sqlite").write_text("faces,rects\n1,2\n")

    with pytest.raises(UsageError, match="not an SQLite database"):
        read_aflw(tmp_path)


def test_fractions_count_all_split_faces() -> None:
    available = torch.ones(100, 5, dtype=torch.bool)
    available[:70, 0] = False

    labelled = draw_labelled_fractions(
        available, (0.5, 0.75, 0.75, 0.4, 1.0), torch.Generator().manual_seed(0)
    )

    assert labelled.sum(dim=0).tolist() == [30, 75, 75, 40, 100]
    assert not (labelled & ~available).any()


def test_labelled_fractions_depend_on_seed_only() -> None:
    available = torch.ones(50, 5, dtype=torch.bool)
    fractions = (0.5, 0.5, 0.5, 0.5, 0.5)

    first = draw_labelled_fractions(available, fractions, torch.Generator().manual_seed(1))
    again = draw_labelled_fractions(available, fractions, torch.Generator().manual_seed(1))
    other = draw_labelled_fractions(available, fractions, torch.Generator().manual_seed(2))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_test_split_same_for_every_seed() -> None:
    train_0, validation_0, test_0 = split_faces(100, 0.3, 0.1, split_seed=0, seed=0)
    train_1, validation_1, test_1 = split_faces(100, 0.3, 0.1, split_seed=0, seed=1)

    assert test_0 == test_1
    assert len(test_0) == 30
    assert validation_0 != validation_1
    assert sorted(train_0 + validation_0 + test_0) == list(range(100))


def test_fractions_option_rejects_wrong_count() -> None:
    assert parse_fractions("0.5,0.75,0.75,0.4,1") == (0.5, 0.75, 0.75, 0.4, 1.0)
    with pytest.raises(UsageError, match="labelled_fractions"):
        parse_fractions("0.5,0.75")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_aflw(tmp_path_factory.mktemp("aflw-demo"), n_images=30, seed=0)


def small_experiment(data_dir: Path, **options: object) -> FaceExperiment:
    return FaceExperiment(data_dir=str(data_dir), preset="small", image_size=32, **options)


def test_demo_database_has_missing_labels(demo_dir: Path) -> None:
    faces = read_aflw(demo_dir)
    labels = available_labels(faces)

    assert len(faces) == 35
    for task in range(4):
        assert 0 < labels[:, task].sum() < len(faces), FACE_TASKS[task]
    assert any(np.isnan(face.landmarks).any() for face in faces)


def test_load_returns_tasks_with_paper_depths(demo_dir: Path) -> None:
    data = small_experiment(demo_dir).load(seed=0)

    assert [task.name for task in data.tasks] == list(FACE_TASKS)
    assert [task.depth for task in data.tasks] == [17, 17, 17, 17, 26]
    assert [task.n_labelled for task in data.tasks] == data.train.labelled.sum(0).tolist()
    assert len(data.train) + len(data.validation) + len(data.test) == 35


def test_input_is_noisy_denoising_target(demo_dir: Path) -> None:
    data = small_experiment(demo_dir).load(seed=0)

    noisy, targets, mask = data.train[0]
    clean = targets[4]
    changed = (noisy != clean).any(dim=0).float().mean().item()

    assert noisy.shape == clean.shape == (3, 32, 32)
    assert 0.05 < changed < 0.2
    assert targets[2].shape == (21, 3)
    assert targets[3].shape == (3,)
    assert mask.dtype == torch.bool
    assert torch.equal(data.train[0][0], noisy)


def test_lazy_items_equal_memory_items(demo_dir: Path) -> None:
    in_memory = small_experiment(demo_dir).load(seed=0)
    lazy = small_experiment(demo_dir, lazy_above=0).load(seed=0)

    assert lazy.train.images.lazy
    assert not in_memory.train.images.lazy
    for index in (0, 5):
        assert torch.equal(lazy.test[index][0], in_memory.test[index][0])
        assert torch.equal(lazy.test[index][1][4], in_memory.test[index][1][4])


def test_model_outputs_match_targets(demo_dir: Path) -> None:
    model = FaceModel(width_divisor=16)
    images = torch.rand(2, 3, 32, 32)

    outputs = model(images)

    assert [tuple(output.shape) for output in outputs] == [
        (2, 1),
        (2, 1),
        (2, 42),
        (2, 3),
        (2, 3, 32, 32),
    ]
    assert outputs[4].min() >= 0
    assert outputs[4].max() <= 1


def test_pretrained_weights_need_paper_preset(tmp_path: Path) -> None:
    weights = tmp_path / "vgg16_bn.pth"
    weights.write_bytes(b"")
    experiment = FaceExperiment(data_dir=str(tmp_path), preset="small", pretrained_path=weights)

    with pytest.raises(UsageError, match="full VGG16 width"):
        experiment.build_model(_tasks())


def test_missing_pretrained_file_is_rejected(tmp_path: Path) -> None:
    experiment = FaceExperiment(pretrained_path=str(tmp_path / "missing.pth"))

    with pytest.raises(UsageError, match="missing.pth not found"):
        experiment.build_model(_tasks())


def _tasks() -> list[Task]:
    return face_tasks([1, 1, 1, 1, 1])


def test_load_without_data_dir_fails() -> None:
    with pytest.raises(UsageError, match="needs data_dir"):
        FaceExperiment(preset="small").load(seed=0)


@pytest.mark.slow
def test_train_face_demo_runs_two_epochs(tmp_path: Path) -> None:
    output = tmp_path / "run"
    status = main(
        [
            "train", "--experiment", "face", "--demo", "--n-epochs", "2", "--device", "cpu",
            "--option", "image_size=32", "--output-dir", str(output),
        ]
    )  # fmt: skip

    assert status == 0
    assert (output / "demo-data" / "aflw.sqlite").is_file()
    epochs = pd.read_csv(output / "epochs.csv")
    assert len(epochs) == 2
    assert math.isfinite(epochs["test_avg_error"].iloc[-1])
    for task in FACE_TASKS:
        assert math.isfinite(epochs[f"train_loss/{task}"].iloc[-1]), task


TABLE9_LAMBDAS = {
    (0.0, 0.25, 0.25, 0.25, 0.25),
    (0.25, 0.0, 0.25, 0.25, 0.25),
    (0.25, 0.25, 0.0, 0.25, 0.25),
    (0.25, 0.25, 0.25, 0.0, 0.25),
    (0.25, 0.25, 0.25, 0.25, 0.0),
    (1.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 1.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 1.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 1.0, 0.0),
    (0.2, 0.2, 0.3, 0.3, 0.0),
    (0.1, 0.1, 0.4, 0.4, 0.0),
    (0.4, 0.4, 0.1, 0.1, 0.0),
    (0.15, 0.15, 0.3, 0.3, 0.1),
    (0.3, 0.3, 0.15, 0.15, 0.1),
    (0.2, 0.2, 0.2, 0.2, 0.2),
}
"""The 15 DST rows of Table 9 of Malhotra et al. (TMLR 2022): lambda_d, c, u, r, b."""


def test_table9_file_lists_paper_rows() -> None:
    config = load_study_file(STUDY_FILE)
    dst_rows = [row for row in config.rows if row.scheduler == "dst"]
    baselines = sorted(row.scheduler for row in config.rows if row.scheduler != "dst")

    assert config.experiment == EXPERIMENT
    assert len(dst_rows) == 15
    assert {row.lambdas for row in dst_rows} == TABLE9_LAMBDAS
    assert {row.count_metric for row in dst_rows} == {"proportional"}
    assert baselines == ["mtl", "random", "random", "stl"]
    assert sorted(row.p for row in config.rows if row.scheduler == "random") == [0.5, 0.75]
    assert config.seeds == (0, 1, 2)
    assert config.n_trials == 19


@pytest.mark.slow
def test_table9_study_runs_on_demo_data(
    tmp_path: Path, postgres_database: Callable[[], str], mlflow_server: MlflowServer
) -> None:
    folder = tmp_path / "data"
    data_dir = write_demo_aflw(folder, n_images=24)
    storage = postgres_database()
    command = [
        sys.executable, "-m", "dst", "study", "run", str(STUDY_FILE),
        "--storage", storage, "--tracking-uri", mlflow_server.url,
        "--data-dir", str(data_dir), "--n-epochs", "2", "--seeds", "1", "--n-trials", "2",
        "--device", "cpu", "--option", "preset=small", *SMALL_OPTIONS,
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("DST_STORAGE", None)
    environment.pop("MLFLOW_TRACKING_URI", None)

    result = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )

    assert result.returncode == 0, result.stderr[-4000:]
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    trials = study.get_trials()
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    labels = [trial.user_attrs["row"]["label"] for trial in complete]
    assert len(trials) == 19
    assert labels == ["traditional MTL", "leave out depth"]
    for trial in complete:
        assert math.isfinite(trial.value), trial.user_attrs["row"]["label"]
    assert "traditional MTL" in result.stdout
