"""Tests of the fingerprint manifest reader, data set and Siamese model, and ``dst train``."""

from __future__ import annotations

import math
import os
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

from dst import UsageError
from dst._study_file import load_study_file
from dst.cli import main
from experiments._fingerprint_data import (
    FINGERPRINT_TASKS,
    PairImages,
    available_labels,
    read_manifest,
    split_pairs,
)
from experiments._fingerprint_demo import write_demo_fingerprints
from experiments.fingerprint import FingerprintExperiment, FingerprintModel

if TYPE_CHECKING:
    from conftest import MlflowServer

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "fingerprint"
STUDY_NAME = f"table9-{EXPERIMENT}"
STUDY_FILE = REPO / "studies" / f"{STUDY_NAME}.toml"
SMALL_OPTIONS = ("--option", "image_height=40", "--option", "image_width=32")

HEADER = "fingerprint,latent,match,fingerprint_class,latent_class,fingerprint_mask,latent_mask"


def write_fixture(folder: Path, rows: list[str], header: str = HEADER) -> Path:
    """Write four 20 by 16 images, two masks and a manifest of ``rows`` under ``folder``.

    ``a.png`` is RGB, ``b.png`` greyscale 50, ``c.png`` RGB and ``d.png`` greyscale 200.
    ``m_top.png`` is white in its top half, ``m_left.png`` in its left half.
    """
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 20), (10, 120, 230)).save(folder / "a.png")
    Image.new("L", (16, 20), 50).save(folder / "b.png")
    Image.new("RGB", (16, 20), (0, 0, 0)).save(folder / "c.png")
    Image.new("L", (16, 20), 200).save(folder / "d.png")
    top = np.zeros((20, 16), dtype=np.uint8)
    top[:10] = 255
    Image.fromarray(top).save(folder / "m_top.png")
    left = np.zeros((20, 16), dtype=np.uint8)
    left[:, :8] = 255
    Image.fromarray(left).save(folder / "m_left.png")
    (folder / "pairs.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder / "pairs.csv"


FULL_ROW = "a.png,b.png,1,whorl,Tented Arch,m_top.png,m_left.png"
PARTIAL_ROW = "c.png,d.png,0,,left-loop,,m_top.png"
UNKNOWN_MATCH_ROW = "a.png,d.png,,twin_loop,,m_left.png,"


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write_fixture(tmp_path / "pairs", [FULL_ROW, PARTIAL_ROW, UNKNOWN_MATCH_ROW])


def test_manifest_rows_resolve_paths_and_labels(manifest: Path) -> None:
    pairs = read_manifest(manifest)

    assert len(pairs) == 3
    assert pairs[0].fingerprint == manifest.parent / "a.png"
    assert pairs[0].latent_mask == manifest.parent / "m_left.png"
    assert [pair.match for pair in pairs] == [True, False, None]
    assert [pair.line for pair in pairs] == [2, 3, 4]


def test_class_names_are_normalised(manifest: Path) -> None:
    pairs = read_manifest(manifest)

    assert [pair.fingerprint_class for pair in pairs] == [0, None, 5]
    assert [pair.latent_class for pair in pairs] == [2, 3, None]


def test_available_labels_follow_manifest_cells(manifest: Path) -> None:
    labels = available_labels(read_manifest(manifest))

    assert labels.tolist() == [
        [True, True, True, True, True],
        [False, False, True, True, True],
        [True, True, False, False, False],
    ]


def test_images_rgb_and_masks_binary(manifest: Path) -> None:
    images = PairImages(read_manifest(manifest), size=(10, 8), lazy=False)

    fingerprint, latent, fingerprint_mask, latent_mask = images[0]
    assert fingerprint.shape == latent.shape == (3, 10, 8)
    assert fingerprint[:, 0, 0].tolist() == [10, 120, 230]
    assert latent[:, 0, 0].tolist() == [50, 50, 50]
    assert fingerprint_mask.shape == (1, 10, 8)
    assert fingerprint_mask[0, :5].eq(1).all()
    assert fingerprint_mask[0, 5:].eq(0).all()
    assert latent_mask[0, :, :4].eq(1).all()
    assert latent_mask[0, :, 4:].eq(0).all()


def test_missing_mask_gives_background_placeholder(manifest: Path) -> None:
    images = PairImages(read_manifest(manifest), size=(10, 8), lazy=False)

    assert images[1][2].eq(0).all()
    assert images[2][3].eq(0).all()


def test_lazy_pairs_equal_memory_pairs(manifest: Path) -> None:
    pairs = read_manifest(manifest)
    in_memory = PairImages(pairs, size=(10, 8), lazy=False)
    lazy = PairImages(pairs, size=(10, 8), lazy=True)

    for index in range(3):
        for lazy_tensor, memory_tensor in zip(lazy[index], in_memory[index], strict=True):
            assert torch.equal(lazy_tensor, memory_tensor)


def test_corrupt_image_names_file(manifest: Path) -> None:
    (manifest.parent / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    pairs = read_manifest(manifest)

    with pytest.raises(UsageError, match=r"d\.png"):
        PairImages(pairs, size=(10, 8), lazy=False)


def test_missing_file_names_line(manifest: Path) -> None:
    (manifest.parent / "m_top.png").unlink()

    with pytest.raises(UsageError, match=r"line 2: fingerprint_mask file .*m_top\.png not found"):
        read_manifest(manifest)


def test_unknown_class_raises_usage_error(tmp_path: Path) -> None:
    manifest = write_fixture(tmp_path, ["a.png,b.png,1,spiral,,,"])

    with pytest.raises(UsageError, match="line 2: unknown fingerprint class 'spiral'"):
        read_manifest(manifest)


def test_invalid_match_raises_usage_error(tmp_path: Path) -> None:
    manifest = write_fixture(tmp_path, ["a.png,b.png,yes,,,,"])

    with pytest.raises(UsageError, match="line 2: invalid match 'yes'"):
        read_manifest(manifest)


def test_missing_column_raises_usage_error(tmp_path: Path) -> None:
    manifest = write_fixture(tmp_path, ["a.png,b.png"], header="fingerprint,latent")

    with pytest.raises(UsageError, match="no column 'match'"):
        read_manifest(manifest)


def test_missing_manifest_raises_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="manifest not found"):
        read_manifest(tmp_path / "pairs.csv")


def test_split_column_decides_test_pairs(tmp_path: Path) -> None:
    rows = [
        f"a.png,b.png,{index % 2},,,,,{'test' if index < 3 else 'train'}" for index in range(9)
    ]
    manifest = write_fixture(tmp_path, rows, header=HEADER + ",split")

    train, validation, test = split_pairs(read_manifest(manifest), 0.5, 0.2, 0, seed=0)

    assert test == [0, 1, 2]
    assert len(validation) == 1
    assert sorted(train + validation) == [3, 4, 5, 6, 7, 8]


def test_partial_split_column_is_rejected(tmp_path: Path) -> None:
    rows = ["a.png,b.png,1,,,,,test", "a.png,b.png,0,,,,,"]
    manifest = write_fixture(tmp_path, rows, header=HEADER + ",split")

    with pytest.raises(UsageError, match="line 3: split is empty"):
        read_manifest(manifest)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_fingerprints(tmp_path_factory.mktemp("fingerprint-demo"), n_pairs=24)


def small_experiment(data_dir: Path, **options: object) -> FingerprintExperiment:
    return FingerprintExperiment(
        data_dir=str(data_dir), preset="small", image_height=40, image_width=32, **options
    )


def test_demo_manifest_has_unlabelled_pairs(demo_dir: Path) -> None:
    labels = available_labels(read_manifest(demo_dir / "pairs.csv"))

    for task, name in enumerate(FINGERPRINT_TASKS):
        assert 0 < labels[:, task].sum() < len(labels), name


def test_load_returns_tasks_with_paper_depths(demo_dir: Path) -> None:
    data = small_experiment(demo_dir).load(seed=0)

    assert [task.name for task in data.tasks] == list(FINGERPRINT_TASKS)
    assert [task.depth for task in data.tasks] == [17, 26, 17, 26, 13]
    assert [task.kind for task in data.tasks][4] == "verification"
    assert len(data.train) + len(data.validation) + len(data.test) == 24


def test_item_contains_pair_and_targets(demo_dir: Path) -> None:
    data = small_experiment(demo_dir).load(seed=0)

    inputs, targets, mask = data.train[0]

    assert set(inputs) == {"fingerprint", "latent"}
    assert inputs["fingerprint"].shape == (3, 40, 32)
    assert inputs["latent"].min() >= 0
    assert inputs["latent"].max() <= 1
    assert targets[0].dtype == torch.int64
    assert targets[1].shape == targets[3].shape == (1, 40, 32)
    assert targets[4].shape == ()
    assert mask.shape == (5,)


def test_model_outputs_at_odd_sizes() -> None:
    model = FingerprintModel(width_divisor=16)
    inputs = {"fingerprint": torch.rand(2, 3, 45, 37), "latent": torch.rand(2, 3, 45, 37)}

    outputs = model(inputs)

    assert [tuple(output.shape) for output in outputs] == [
        (2, 6),
        (2, 1, 45, 37),
        (2, 6),
        (2, 1, 45, 37),
        (2,),
    ]


def test_siamese_branches_share_weights() -> None:
    model = FingerprintModel(width_divisor=16).eval()
    image = torch.rand(3, 3, 32, 32)

    distance = model.heads[4](model.shared({"fingerprint": image, "latent": image}))

    assert model.heads[1].decoder is model.heads[3].decoder
    assert distance.max().item() < 1e-4


def test_margin_above_two_is_rejected() -> None:
    with pytest.raises(UsageError, match="margin"):
        FingerprintExperiment(margin=3.0)


@pytest.mark.slow
def test_train_fingerprint_demo_runs_two_epochs(tmp_path: Path) -> None:
    output = tmp_path / "run"
    status = main(
        [
            "train", "--experiment", "fingerprint", "--demo", "--n-epochs", "2",
            "--device", "cpu", "--option", "image_height=40", "--option", "image_width=32",
            "--output-dir", str(output),
        ]
    )  # fmt: skip

    assert status == 0
    assert (output / "demo-data" / "pairs.csv").is_file()
    epochs = pd.read_csv(output / "epochs.csv")
    assert len(epochs) == 2
    for task in FINGERPRINT_TASKS:
        assert math.isfinite(epochs[f"train_loss/{task}"].iloc[-1]), task
        assert math.isfinite(epochs[f"test_error/{task}"].iloc[-1]), task


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
    data_dir = write_demo_fingerprints(folder, n_pairs=24)
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
