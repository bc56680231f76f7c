"""The ``omniglot`` experiment: layouts, splits, labels, bad inputs and the models."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dst import UsageError, create_experiment
from dst._trainer import TrainConfig, train_experiment
from experiments.omniglot import (
    OmniglotExperiment,
    decode_drawings,
    find_drawings,
    write_demo_alphabets,
)

REAL_COUNTS = {"Balinese": 480, "Early_Aramaic": 440, "Greek": 480, "Korean": 800, "Latin": 520}
AWKWARD_NAMES = ["Japanese_(hiragana)", "N_Ko", "Ge.ez script", "Ünicode, with comma"]


def write_alphabets(root: Path, names: list[str], n_characters: int = 3) -> None:
    write_demo_alphabets(root, names, n_characters, n_drawings=10, seed=0)


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    write_alphabets(tmp_path / "images_background", ["Alpha", "Beta"])
    return tmp_path


def split_counts(dataset: torch.utils.data.Dataset, n_tasks: int) -> list[int]:
    counts = torch.zeros(n_tasks, dtype=torch.long)
    for index in range(len(dataset)):
        counts += dataset[index][2].long()
    return counts.tolist()


def test_real_zip_counts_per_alphabet(omniglot_zip: Path) -> None:
    drawings = find_drawings(omniglot_zip)
    assert Counter(drawing.alphabet for drawing in drawings) == REAL_COUNTS


def test_real_zip_splits_80_20_per_character(omniglot_zip: Path) -> None:
    data = OmniglotExperiment(data_dir=omniglot_zip).load(seed=0)
    names = [task.name for task in data.tasks]
    assert names == sorted(REAL_COUNTS)
    test_counts = split_counts(data.test, len(names))
    assert test_counts == [REAL_COUNTS[name] // 5 for name in names]
    train_counts = split_counts(data.train, len(names))
    validation_counts = split_counts(data.validation, len(names))
    for index, name in enumerate(names):
        assert train_counts[index] + validation_counts[index] == REAL_COUNTS[name] * 4 // 5
        assert data.tasks[index].n_labelled == train_counts[index]
    assert len(data.validation) == round(0.1 * sum(REAL_COUNTS.values()) * 4 / 5)


def test_real_zip_images_decode_as_strokes(omniglot_zip: Path) -> None:
    drawings = find_drawings(omniglot_zip)[:20]
    images = decode_drawings(omniglot_zip, drawings, 28)
    assert images.shape == (20, 28, 28)
    assert images.dtype == torch.uint8
    # Strokes are bright on a dark background and cover a small part of each image.
    ink = images.float().mean(dim=(1, 2)) / 255
    assert (ink > 0.01).all()
    assert (ink < 0.5).all()


def test_test_split_is_last_drawings_by_name(small_folder: Path) -> None:
    drawings = find_drawings(small_folder)
    data = OmniglotExperiment(data_dir=small_folder, image_size=16).load(seed=0)
    images = decode_drawings(small_folder, drawings, 16)
    last_two = [i for i, d in enumerate(drawings) if d.member.endswith(("_09.png", "_10.png"))]
    expected = images[last_two].float() / 255
    test_inputs = torch.stack([data.test[i][0][0] for i in range(len(data.test))])
    assert len(data.test) == len(last_two)
    assert torch.equal(test_inputs, expected)


def test_test_split_fixed_across_seeds(small_folder: Path) -> None:
    experiment = OmniglotExperiment(data_dir=small_folder, image_size=16)
    first, second = experiment.load(seed=0), experiment.load(seed=1)
    assert torch.equal(first.test.inputs, second.test.inputs)
    assert first.validation.indices != second.validation.indices


def test_each_image_labelled_for_own_alphabet(small_folder: Path) -> None:
    data = OmniglotExperiment(data_dir=small_folder, image_size=16).load(seed=0)
    for index in range(len(data.train)):
        _, targets, mask = data.train[index]
        assert mask.sum() == 1
        own = int(mask.nonzero())
        others = [target for task, target in enumerate(targets) if task != own]
        assert all(target == 0 for target in others)
        assert 0 <= targets[own] < 3


def test_awkward_alphabet_names_kept_verbatim(tmp_path: Path) -> None:
    write_alphabets(tmp_path / "images_evaluation", AWKWARD_NAMES, n_characters=2)
    data = OmniglotExperiment(data_dir=tmp_path, image_size=16).load(seed=0)
    assert [task.name for task in data.tasks] == sorted(AWKWARD_NAMES)
    assert all(task.n_labelled > 0 for task in data.tasks)


def test_alphabets_option_selects_subset(tmp_path: Path) -> None:
    write_alphabets(tmp_path / "images_background", AWKWARD_NAMES, n_characters=2)
    selected = ["N_Ko", "Japanese_(hiragana)"]
    data = OmniglotExperiment(data_dir=tmp_path, image_size=16, alphabets=selected).load(0)
    assert [task.name for task in data.tasks] == sorted(selected)
    from_text = OmniglotExperiment(data_dir=tmp_path, alphabets="N_Ko, Ge.ez script")
    assert from_text.alphabets == ["N_Ko", "Ge.ez script"]


def test_unknown_alphabet_lists_available(small_folder: Path) -> None:
    experiment = OmniglotExperiment(data_dir=small_folder, alphabets=["Gamma"])
    with pytest.raises(UsageError, match="'Gamma' not found.*Alpha, Beta"):
        experiment.load(seed=0)


def test_torchvision_layout_is_found(tmp_path: Path) -> None:
    write_alphabets(tmp_path / "omniglot-py" / "images_background", ["Alpha"])
    write_alphabets(tmp_path / "omniglot-py" / "images_evaluation", ["Beta"])
    drawings = find_drawings(tmp_path)
    assert Counter(drawing.alphabet for drawing in drawings) == {"Alpha": 30, "Beta": 30}


def test_image_set_folder_itself_is_accepted(small_folder: Path) -> None:
    drawings = find_drawings(small_folder / "images_background")
    assert len(drawings) == 60


def test_zip_of_folder_layout_is_read(small_folder: Path, tmp_path: Path) -> None:
    archive_path = tmp_path / "omniglot.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for path in sorted((small_folder / "images_background").rglob("*.png")):
            archive.write(path, path.relative_to(small_folder).as_posix())
    from_zip = OmniglotExperiment(data_dir=archive_path, image_size=16).load(seed=0)
    from_folder = OmniglotExperiment(data_dir=small_folder, image_size=16).load(seed=0)
    assert torch.equal(from_zip.test.inputs, from_folder.test.inputs)
    assert [task.n_labelled for task in from_zip.tasks] == [
        task.n_labelled for task in from_folder.tasks
    ]
    assert sum(task.n_labelled for task in from_zip.tasks) == len(from_zip.train)


def test_same_alphabet_in_two_image_sets_raises(tmp_path: Path) -> None:
    write_alphabets(tmp_path / "images_background_small1", ["Alpha"], n_characters=1)
    write_alphabets(tmp_path / "images_background_small2", ["Alpha"], n_characters=1)
    with pytest.raises(UsageError, match="'Alpha' appears in both"):
        find_drawings(tmp_path)


def test_missing_data_dir_option_raises() -> None:
    with pytest.raises(UsageError, match="needs the option data_dir"):
        create_experiment("omniglot", {})


def test_missing_path_raises_with_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    experiment = OmniglotExperiment(data_dir=missing)
    with pytest.raises(UsageError, match=f"'{missing}' not found.*images_background"):
        experiment.load(seed=0)


def test_empty_folder_raises_with_layout(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no Omniglot images found.*images_background"):
        OmniglotExperiment(data_dir=tmp_path).load(seed=0)


def test_wrong_layout_raises_with_layout(tmp_path: Path) -> None:
    write_alphabets(tmp_path / "my_images", ["Alpha"], n_characters=1)
    with pytest.raises(UsageError, match=f"no Omniglot images found in '{tmp_path}'"):
        OmniglotExperiment(data_dir=tmp_path).load(seed=0)


def test_plain_file_raises_not_zip(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("not an archive")
    with pytest.raises(UsageError, match="neither a folder nor a zip"):
        OmniglotExperiment(data_dir=path).load(seed=0)


def test_corrupt_png_raises_naming_file(small_folder: Path) -> None:
    broken = small_folder / "images_background" / "Beta" / "character02" / "0002_03.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UsageError, match="cannot decode Omniglot image.*0002_03.png"):
        OmniglotExperiment(data_dir=small_folder).load(seed=0)


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"preset": "large"}, "preset"),
        ({"image_size": 4}, "image_size"),
        ({"test_fraction": 0}, "test_fraction"),
        ({"alphabets": []}, "alphabets"),
        ({"weights": "vgg.pth"}, "paper"),
    ],
)
def test_invalid_options_raise_usage_error(options: dict, word: str) -> None:
    with pytest.raises(UsageError, match=word):
        OmniglotExperiment(data_dir="omniglot.zip", **options)


def test_small_model_has_one_branch_per_alphabet(small_folder: Path) -> None:
    experiment = OmniglotExperiment(data_dir=small_folder, width=4)
    data = experiment.load(seed=0)
    model = experiment.build_model(data.tasks)
    assert [task.depth for task in data.tasks] == [8, 8]
    inputs = torch.stack([data.train[i][0] for i in range(4)])
    assert inputs.shape == (4, 1, 28, 28)
    outputs = model(inputs)
    assert [tuple(output.shape) for output in outputs] == [(4, 3), (4, 3)]


def test_build_model_before_load_scans_classes(small_folder: Path) -> None:
    experiment = OmniglotExperiment(data_dir=small_folder, width=4)
    tasks = experiment.load(seed=0).tasks
    fresh = OmniglotExperiment(data_dir=small_folder, width=4)
    model = fresh.build_model(tasks)
    assert [head.layers[-1].out_features for head in model.heads] == [3, 3]


def test_paper_preset_loads_local_weights(small_folder: Path, tmp_path: Path) -> None:
    from torchvision.models import vgg16

    features = vgg16(weights=None).features
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    weights = tmp_path / "vgg16-features.pth"
    torch.save(state, weights)
    experiment = OmniglotExperiment(data_dir=small_folder, preset="paper", weights=str(weights))
    data = experiment.load(seed=0)
    model = experiment.build_model(data.tasks)
    assert experiment.image_size == 105
    assert [task.depth for task in data.tasks] == [16, 16]
    assert torch.equal(model.encoder[0].weight, features[0].weight)
    assert model.heads[0].layers[1].in_features == 512 * 3 * 3
    model.eval()
    with torch.no_grad():
        outputs = model(data.test[0][0][None])
    assert outputs[0].shape == (1, 3)


def test_paper_preset_missing_weights_raises(small_folder: Path, tmp_path: Path) -> None:
    missing = tmp_path / "vgg16.pth"
    experiment = OmniglotExperiment(data_dir=small_folder, preset="paper", weights=missing)
    data = experiment.load(seed=0)
    with pytest.raises(UsageError, match="weights file .*vgg16.pth' not found"):
        experiment.build_model(data.tasks)


def test_paper_preset_invalid_weights_raises(small_folder: Path, tmp_path: Path) -> None:
    weights = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    experiment = OmniglotExperiment(data_dir=small_folder, preset="paper", weights=weights)
    data = experiment.load(seed=0)
    with pytest.raises(UsageError, match="cannot load VGG16 weights") as caught:
        experiment.build_model(data.tasks)
    assert "\n" not in str(caught.value)


def test_demo_data_loads(tmp_path: Path) -> None:
    options = OmniglotExperiment.demo(tmp_path)
    data = OmniglotExperiment(**options).load(seed=0)
    assert len(data.tasks) == 3
    assert len(data.test) == 3 * 6 * 4


def test_training_on_demo_lowers_validation_error(tmp_path: Path) -> None:
    options = OmniglotExperiment.demo(tmp_path)
    experiment = OmniglotExperiment(**options, width=8, image_size=16)
    config = TrainConfig(n_epochs=5, device="cpu", seed=0)
    _, result = train_experiment(experiment, "dst", config)
    errors = np.array([record.val_avg_error for record in result.records])
    assert np.isfinite(errors).all()
    assert errors[-1] < errors[0] - 30
