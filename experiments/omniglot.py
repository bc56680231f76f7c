"""``omniglot``: one character-classification task per Omniglot alphabet.

The data are read from a folder or a zip file in the layout of the Omniglot release and of
torchvision: ``images_background*/<alphabet>/<character>/<drawing>.png``, or
``images_evaluation*``. That folder may be at the top of ``data_dir``, one folder down as in
torchvision's ``omniglot-py/images_background``, or ``data_dir`` itself. Task names are the
alphabet folder names, unchanged.

Each alphabet is one classification task over its characters, as in the Omniglot experiment
of Malhotra et al. (Dropped Scheduled Task, TMLR 2022). The last 20 % of each character's
drawings in file-name order form the test split, the same for every run. The run seed picks
the validation images from the rest. Each image is labelled for its own alphabet only, so an
alphabet's labelled count is its number of training images.

Two presets build the model. ``small`` is a VGG-style conv encoder for CPUs at 28x28
pixels. ``paper`` is torchvision's VGG16 encoder at 105x105 pixels, initialised from a
local weights file when ``weights`` names one; nothing is ever downloaded. In both, each
task reads the flattened encoder output through a branch of three dense layers.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from tqdm.auto import tqdm

from dst._errors import UsageError
from dst._experiment import Experiment, ExperimentData, MultiTaskModel, Task, split_validation
from dst._metrics import Accuracy, cross_entropy
from experiments._data import TensorTaskDataset, check_fraction, check_int
from experiments._vgg import DenseBranch, VGGEncoder

_logger = logging.getLogger(__name__)

EXPECTED_LAYOUT = (
    "images_background*/<alphabet>/<character>/<drawing>.png or images_evaluation*/...,"
    " at the top of the folder or zip or inside omniglot-py/"
)
_IMAGE_SET = re.compile(r"images_(background|evaluation)", re.IGNORECASE)
PRESETS = ("small", "paper")
PRESET_IMAGE_SIZES = {"small": 28, "paper": 105}
BRANCH_HIDDEN_FEATURES = {"small": (128, 128), "paper": (512, 512)}
"""Widths of the two hidden layers of each task branch, per preset.

NOTE: the DST paper gives three dense layers per branch but not their widths, so the
``paper`` preset's 512 is a guess, and that preset has not been trained to the paper's error.
"""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Drawing:
    """One image file of the data set.

    Attributes:
        alphabet: Alphabet folder name, the task name.
        character: Character folder name.
        member: Path of the file inside the zip, or the file path in a folder.
    """

    alphabet: str
    character: str
    member: str


class OmniglotExperiment(Experiment):
    """Omniglot alphabets as tasks, read from a folder or zip of the standard layout.

    Options:
        data_dir: Folder or zip file with the Omniglot images (required).
        alphabets: Alphabet names to keep, as a list or a comma-separated string. None
            keeps all.
        preset: ``"small"`` (a CPU-sized VGG-style encoder) or ``"paper"`` (VGG16).
        image_size: Side of the square input in pixels; None takes 28 for ``small`` and
            105 for ``paper``.
        width: Channels of the first encoder stage of the ``small`` preset.
        weights: Path of a torchvision VGG16 state dict, such as ImageNet weights, that
            initialises the ``paper`` encoder; None starts from random weights.
        test_fraction: Fraction of each character's drawings held out for test.
        validation_fraction: Fraction of the training images held out for validation.
    """

    name: ClassVar[str] = "omniglot"
    defaults: ClassVar[dict[str, Any]] = {
        "data_dir": None,
        "alphabets": None,
        "preset": "small",
        "image_size": None,
        "width": 16,
        "weights": None,
        "test_fraction": 0.2,
        "validation_fraction": 0.1,
    }
    train_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "batch_size": 32}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not self.options["data_dir"]:
            raise UsageError(
                "experiment 'omniglot' needs the option data_dir: give --data-dir with a folder"
                f" or zip of the layout {EXPECTED_LAYOUT}"
            )
        self.data_dir = Path(self.options["data_dir"]).expanduser()
        self.preset = _check_preset(self.options["preset"])
        if self.options["image_size"] is None:
            self.image_size = PRESET_IMAGE_SIZES[self.preset]
        else:
            self.image_size = check_int(self.options, "image_size", 2 ** _n_pools(self.preset))
        self.width = check_int(self.options, "width", 1)
        self.test_fraction = check_fraction(self.options, "test_fraction")
        self.validation_fraction = check_fraction(self.options, "validation_fraction")
        self.alphabets = _parse_alphabets(self.options["alphabets"])
        self.weights = self.options["weights"]
        if self.weights is not None and self.preset != "paper":
            raise UsageError(
                f"option weights={self.weights!r} applies to the 'paper' preset only;"
                " add preset=paper or drop weights"
            )
        self._n_classes: dict[str, int] | None = None

    def check_data(self) -> None:
        """Raise UsageError unless ``data_dir`` contains Omniglot images, reading no image."""
        find_drawings(self.data_dir)

    def load(self, seed: int) -> ExperimentData:
        drawings = self._select(find_drawings(self.data_dir))
        images = decode_drawings(self.data_dir, drawings, self.image_size)
        alphabets = sorted({drawing.alphabet for drawing in drawings})
        characters = _characters_by_alphabet(drawings)
        self._n_classes = {name: len(characters[name]) for name in alphabets}

        task_index = torch.tensor([alphabets.index(d.alphabet) for d in drawings])
        class_index = torch.tensor([characters[d.alphabet].index(d.character) for d in drawings])
        is_test = _test_mask(drawings, self.test_fraction)
        pool = _make_dataset(images, task_index, class_index, len(alphabets), ~is_test)
        test = _make_dataset(images, task_index, class_index, len(alphabets), is_test)
        train, validation = split_validation(pool, self.validation_fraction, seed)

        n_labelled = pool.mask[train.indices].sum(dim=0).tolist()
        depth = self._encoder_depth() + len(BRANCH_HIDDEN_FEATURES[self.preset]) + 1
        tasks = [
            Task(name, "classification", cross_entropy, Accuracy, depth, int(count))
            for name, count in zip(alphabets, n_labelled, strict=True)
        ]
        _logger.info(
            "Omniglot: %d alphabets, %d images: %d train, %d validation, %d test",
            len(alphabets),
            len(drawings),
            len(train),
            len(validation),
            len(test),
        )
        return ExperimentData(tasks=tasks, train=train, validation=validation, test=test)

    def build_model(self, tasks: Sequence[Task]) -> MultiTaskModel:
        if self._n_classes is None:
            drawings = self._select(find_drawings(self.data_dir))
            characters = _characters_by_alphabet(drawings)
            self._n_classes = {name: len(names) for name, names in characters.items()}
        unknown = [task.name for task in tasks if task.name not in self._n_classes]
        if unknown:
            raise UsageError(
                f"task {unknown[0]!r} is not an alphabet of {str(self.data_dir)!r};"
                " build the model from the tasks that load() returns"
            )
        n_classes = [self._n_classes[task.name] for task in tasks]
        if self.preset == "paper":
            return OmniglotModel(_vgg16_encoder(self.weights), self.image_size, n_classes, True)
        encoder = VGGEncoder(1, _small_stages(self.width))
        return OmniglotModel(encoder, self.image_size, n_classes, False)

    @classmethod
    def demo(cls, folder: Path) -> dict[str, Any]:
        """Write three generated alphabets in the Omniglot layout under ``folder``."""
        root = Path(folder) / "images_background_demo"
        write_demo_alphabets(root, ["Demo_Alpha", "Demo_(Beta)", "Demo Gamma"], 6, 20, 0)
        return {"data_dir": str(folder)}

    def _select(self, drawings: list[Drawing]) -> list[Drawing]:
        if self.alphabets is None:
            return drawings
        available = sorted({drawing.alphabet for drawing in drawings})
        missing = [name for name in self.alphabets if name not in available]
        if missing:
            raise UsageError(
                f"alphabet {missing[0]!r} not found in {str(self.data_dir)!r}; the alphabets"
                f" there are: {', '.join(available)}"
            )
        return [drawing for drawing in drawings if drawing.alphabet in self.alphabets]

    def _encoder_depth(self) -> int:
        if self.preset == "paper":
            return 13
        return sum(len(stage) for stage in _small_stages(self.width))


class OmniglotModel(MultiTaskModel):
    """A conv encoder and one branch of three dense layers per alphabet.

    Args:
        encoder: Module that maps ``(batch, channels, size, size)`` images to a feature map;
            a :class:`VGGEncoder` or the ``features`` of torchvision's VGG16.
        image_size: Side of the input images in pixels.
        n_classes: Number of characters of each alphabet, in task order.
        imagenet_input: Whether to repeat the grey channel three times and normalise it
            with the ImageNet mean and standard deviation, as VGG16 weights expect.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, encoder: nn.Module, image_size: int, n_classes: Sequence[int], imagenet_input: bool
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.imagenet_input = imagenet_input
        if imagenet_input:
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        in_features = self._count_features(image_size)
        hidden = BRANCH_HIDDEN_FEATURES["paper" if imagenet_input else "small"]
        self.heads = nn.ModuleList(
            DenseBranch(in_features, hidden, n_out, dropout=0.5 if imagenet_input else 0.0)
            for n_out in n_classes
        )

    def shared(self, inputs: Tensor) -> Tensor:
        if self.imagenet_input:
            inputs = (inputs.expand(-1, 3, -1, -1) - self.mean) / self.std
        features = self.encoder(inputs)
        return getattr(features, "features", features)

    def _count_features(self, image_size: int) -> int:
        with torch.no_grad():
            was_training = self.encoder.training
            self.encoder.eval()
            features = self.shared(torch.zeros(1, 1, image_size, image_size))
            self.encoder.train(was_training)
        if features.shape[-1] == 0:
            raise UsageError(f"image_size {image_size} is too small for the encoder's pools")
        return features[0].numel()


def find_drawings(data_dir: Path) -> list[Drawing]:
    """List the Omniglot PNG files under a folder or in a zip, sorted by path.

    Raises:
        UsageError: ``data_dir`` is missing, contains no PNG file in the expected layout,
            or contains the same alphabet in two image sets.
    """
    if not data_dir.exists():
        raise UsageError(
            f"Omniglot data_dir {str(data_dir)!r} not found; give a folder or zip with"
            f" {EXPECTED_LAYOUT}"
        )
    drawings = []
    image_sets: dict[str, str] = {}
    for member, parts in _list_pngs(data_dir):
        if len(parts) < 4 or not _IMAGE_SET.match(parts[-4]):
            continue
        alphabet, character = parts[-3], parts[-2]
        image_set = "/".join(parts[:-3])
        if image_sets.setdefault(alphabet, image_set) != image_set:
            raise UsageError(
                f"alphabet {alphabet!r} appears in both {image_sets[alphabet]!r} and"
                f" {image_set!r} of {str(data_dir)!r}; point data_dir at one image set"
            )
        drawings.append(Drawing(alphabet, character, member))
    if not drawings:
        raise UsageError(
            f"no Omniglot images found in {str(data_dir)!r}; expected {EXPECTED_LAYOUT}"
        )
    return sorted(drawings, key=lambda drawing: drawing.member)


def _list_pngs(data_dir: Path) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Yield ``(member, path parts)`` of each PNG file, the parts led by the folder's name."""
    if data_dir.is_file():
        if not zipfile.is_zipfile(data_dir):
            raise UsageError(
                f"Omniglot data_dir {str(data_dir)!r} is neither a folder nor a zip file;"
                f" give a folder or zip with {EXPECTED_LAYOUT}"
            )
        with zipfile.ZipFile(data_dir) as archive:
            names = archive.namelist()
        for name in names:
            parts = PurePosixPath(name).parts
            if _is_png(parts) and parts[0] != "__MACOSX":
                yield name, parts
        return
    for path in data_dir.rglob("*"):
        parts = (data_dir.name, *path.relative_to(data_dir).parts)
        if _is_png(parts) and path.is_file():
            yield str(path), parts


def _is_png(parts: tuple[str, ...]) -> bool:
    return bool(parts) and parts[-1].lower().endswith(".png") and not parts[-1].startswith(".")


def decode_drawings(data_dir: Path, drawings: Sequence[Drawing], image_size: int) -> Tensor:
    """Decode every drawing once into a ``uint8`` tensor ``(n, image_size, image_size)``.

    Pixels are 255 on a stroke and 0 on the background, so a zero image is blank.

    Raises:
        UsageError: A file is not a readable image; the message names it.
    """
    started = time.perf_counter()
    images = np.empty((len(drawings), image_size, image_size), dtype=np.uint8)
    archive = zipfile.ZipFile(data_dir) if data_dir.is_file() else None
    try:
        progress = tqdm(drawings, desc="decoding Omniglot", unit="image", leave=False)
        for index, drawing in enumerate(progress):
            if archive is not None:
                data = archive.read(drawing.member)
            else:
                data = Path(drawing.member).read_bytes()
            images[index] = _decode_png(data, image_size, _describe(data_dir, drawing))
    finally:
        if archive is not None:
            archive.close()
    _logger.info(
        "decoded %d Omniglot images at %dx%d pixels in %.1f s",
        len(drawings),
        image_size,
        image_size,
        time.perf_counter() - started,
    )
    return torch.from_numpy(images)


def _decode_png(data: bytes, image_size: int, description: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            grey = image.convert("L")
            if grey.size != (image_size, image_size):
                grey = grey.resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels = np.asarray(grey, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UsageError(
            f"cannot decode Omniglot image {description}: {_first_line(error)};"
            " replace or remove the file"
        ) from None
    return 255 - pixels


def _describe(data_dir: Path, drawing: Drawing) -> str:
    if data_dir.is_file():
        return f"{drawing.member!r} in {str(data_dir)!r}"
    return repr(drawing.member)


def _characters_by_alphabet(drawings: Sequence[Drawing]) -> dict[str, list[str]]:
    characters: dict[str, set[str]] = {}
    for drawing in drawings:
        characters.setdefault(drawing.alphabet, set()).add(drawing.character)
    return {name: sorted(values) for name, values in characters.items()}


def _test_mask(drawings: Sequence[Drawing], test_fraction: float) -> Tensor:
    """Mark the last ``test_fraction`` of each character's drawings, by file name, as test."""
    by_character: dict[tuple[str, str], list[int]] = {}
    for index, drawing in enumerate(drawings):
        by_character.setdefault((drawing.alphabet, drawing.character), []).append(index)
    is_test = torch.zeros(len(drawings), dtype=torch.bool)
    for indices in by_character.values():
        indices.sort(key=lambda index: PurePosixPath(drawings[index].member).name)
        n_test = round(test_fraction * len(indices))
        if n_test:
            is_test[indices[-n_test:]] = True
    return is_test


def _make_dataset(
    images: Tensor, task_index: Tensor, class_index: Tensor, n_tasks: int, rows: Tensor
) -> TensorTaskDataset:
    """Build the data set of the selected rows, each labelled for its own alphabet only."""
    selected = rows.nonzero().squeeze(1)
    own_task = task_index[selected]
    mask = torch.zeros(len(selected), n_tasks, dtype=torch.bool)
    mask[torch.arange(len(selected)), own_task] = True
    # Class 0 is the placeholder target of the other alphabets.
    targets = torch.zeros(len(selected), n_tasks, dtype=torch.long)
    targets[torch.arange(len(selected)), own_task] = class_index[selected]
    return TensorTaskDataset(
        images[selected], list(targets.unbind(dim=1)), mask, transform=_to_float_image
    )


def _to_float_image(pixels: Tensor) -> Tensor:
    """Convert ``uint8`` pixels ``(size, size)`` to a float image ``(1, size, size)`` in [0, 1]."""
    return pixels.unsqueeze(0).float().div_(255)


def _check_preset(preset: Any) -> str:
    if preset not in PRESETS:
        raise UsageError(f"invalid option preset={preset!r}; use one of {', '.join(PRESETS)}")
    return preset


def _n_pools(preset: str) -> int:
    return 5 if preset == "paper" else 3


def _parse_alphabets(alphabets: Any) -> list[str] | None:
    if alphabets is None:
        return None
    if isinstance(alphabets, str):
        names = [name.strip() for name in alphabets.split(",") if name.strip()]
    elif isinstance(alphabets, Sequence) and all(isinstance(name, str) for name in alphabets):
        names = list(alphabets)
    else:
        names = []
    if not names:
        raise UsageError(
            f"invalid option alphabets={alphabets!r}; give alphabet folder names as a list"
            " or a comma-separated string"
        )
    return names


def _small_stages(width: int) -> list[tuple[int, ...]]:
    return [(width, width), (2 * width, 2 * width), (4 * width,)]


def _vgg16_encoder(weights: str | None) -> nn.Module:
    """Return the 13-convolution ``features`` part of torchvision's VGG16.

    ``weights`` names a local state dict of the whole VGG16 (``features.*`` keys, as in
    torchvision's ImageNet file) or of ``features`` alone.
    """
    from torchvision.models import vgg16

    path = None if weights is None else Path(weights).expanduser()
    if path is not None and not path.is_file():
        raise UsageError(
            f"VGG16 weights file {str(path)!r} not found; give the path of a local state dict"
            " such as torchvision's vgg16-397923af.pth (nothing is downloaded)"
        )
    features = vgg16(weights=None).features
    if path is None:
        _logger.info("VGG16 encoder starts from random weights; give weights=PATH for ImageNet")
        return features
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        prefix = "features."
        prefixed = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        features.load_state_dict(prefixed or state)
    except (RuntimeError, AttributeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise UsageError(
            f"cannot load VGG16 weights from {str(path)!r}: {_first_line(error)}; give a state"
            " dict of torchvision's vgg16 or of its features"
        ) from None
    _logger.info("VGG16 encoder initialised from %s", path)
    return features


def _first_line(error: BaseException, max_length: int = 200) -> str:
    """Return the first line of an error message, cut to ``max_length`` characters."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:max_length]


def write_demo_alphabets(
    root: Path, alphabets: Sequence[str], n_characters: int, n_drawings: int, seed: int
) -> None:
    """Write generated 105x105 drawings under ``root/<alphabet>/<character>/``.

    Each character is a fixed set of three random strokes, and each drawing of it moves the
    stroke ends by a few pixels, so a small model can learn to distinguish the characters.
    """
    generator = np.random.default_rng(seed)
    for alphabet in alphabets:
        for character in range(1, n_characters + 1):
            folder = root / alphabet / f"character{character:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            strokes = generator.uniform(15, 90, size=(3, 4))
            for drawing in range(1, n_drawings + 1):
                jittered = strokes + generator.normal(0, 3, size=strokes.shape)
                image = _draw_strokes(jittered)
                image.save(folder / f"{character:04d}_{drawing:02d}.png")


def _draw_strokes(strokes: np.ndarray) -> Image.Image:
    from PIL import ImageDraw

    image = Image.new("L", (105, 105), color=255)
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in strokes:
        draw.line([(x0, y0), (x1, y1)], fill=0, width=4)
    return image.convert("1")
