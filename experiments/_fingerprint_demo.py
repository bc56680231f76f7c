"""Generator of a small fingerprint pair set: a ``pairs.csv`` manifest, images and masks.

Each generated finger has a pattern class, a core position, a ridge frequency and a
rotation. Its fingerprint is a ridge pattern drawn from the class's phase field inside an
elliptic foreground on a light background. A latent fingerprint shows a smaller, fainter and
noisier part of a finger's ridges on a cluttered background. Half of the pairs match (the
latent comes from the same finger), the others take the latent of another finger. The
manifest follows :mod:`experiments._fingerprint_data`. Some rows leave a class, a mask or
the match label empty, as partly annotated real sets do.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from experiments._fingerprint_data import FINGERPRINT_CLASSES, MANIFEST_NAME

_logger = logging.getLogger(__name__)

DEMO_SIZE = (85, 70)
"""Height and width of the generated images: the 340 by 280 fingerprints of Malhotra et al.
(Dropped Scheduled Task, TMLR 2022) divided by 4."""

_COLUMNS = (
    "fingerprint",
    "latent",
    "match",
    "fingerprint_class",
    "latent_class",
    "fingerprint_mask",
    "latent_mask",
)


@dataclass(frozen=True)
class _Finger:
    """The parameters of one generated finger."""

    pattern: int
    core: tuple[float, float]
    frequency: float
    angle: float


def write_demo_fingerprints(folder: Path, n_pairs: int = 60, seed: int = 0) -> Path:
    """Write ``pairs.csv`` and PNG images and masks for ``n_pairs`` pairs under ``folder``.

    Returns ``folder``, the ``data_dir`` of the fingerprint experiment.
    """
    folder = Path(folder)
    for subfolder in ("fingerprints", "latents", "masks"):
        (folder / subfolder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fingers = [_random_finger(rng) for _ in range(n_pairs)]
    rows = []
    for index, finger in enumerate(fingers):
        match = index % 2 == 0
        latent_finger = finger if match else fingers[(index + 1 + index // 2) % n_pairs]
        if not match and latent_finger is finger:
            latent_finger = _random_finger(rng)
        rows.append(_write_pair(folder, index, finger, latent_finger, match, rng))
    with (folder / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    _logger.info("wrote a demo set of %d fingerprint pairs to %s", n_pairs, folder)
    return folder


def _random_finger(rng: np.random.Generator) -> _Finger:
    return _Finger(
        pattern=int(rng.integers(len(FINGERPRINT_CLASSES))),
        core=(rng.uniform(-0.1, 0.1), rng.uniform(-0.15, 0.05)),
        frequency=rng.uniform(9.0, 13.0),
        angle=rng.uniform(-0.3, 0.3),
    )


def _write_pair(
    folder: Path,
    index: int,
    finger: _Finger,
    latent_finger: _Finger,
    match: bool,
    rng: np.random.Generator,
) -> dict[str, str]:
    fingerprint, fingerprint_mask = _draw_fingerprint(finger, rng)
    latent, latent_mask = _draw_latent(latent_finger, rng)
    paths = {
        "fingerprint": f"fingerprints/f{index:04d}.png",
        "latent": f"latents/l{index:04d}.png",
        "fingerprint_mask": f"masks/f{index:04d}.png",
        "latent_mask": f"masks/l{index:04d}.png",
    }
    Image.fromarray(fingerprint).save(folder / paths["fingerprint"])
    Image.fromarray(latent).save(folder / paths["latent"])
    Image.fromarray(fingerprint_mask * 255).save(folder / paths["fingerprint_mask"])
    Image.fromarray(latent_mask * 255).save(folder / paths["latent_mask"])
    row = {
        **paths,
        "match": str(int(match)),
        "fingerprint_class": FINGERPRINT_CLASSES[finger.pattern],
        "latent_class": FINGERPRINT_CLASSES[latent_finger.pattern].replace("_", " "),
    }
    # Leave some labels out, so that every task has unlabelled pairs.
    for column, probability in (
        ("fingerprint_class", 0.15),
        ("latent_class", 0.25),
        ("fingerprint_mask", 0.1),
        ("latent_mask", 0.2),
        ("match", 0.05),
    ):
        if rng.random() < probability:
            row[column] = ""
    return row


def _grid(rng: np.random.Generator, finger: _Finger) -> tuple[np.ndarray, np.ndarray]:
    """Return pixel coordinates relative to the finger's core, rotated by its angle."""
    height, width = DEMO_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(float)
    x = (x - width / 2) / height - finger.core[0] + rng.normal(0, 0.005)
    y = (y - height / 2) / height - finger.core[1] + rng.normal(0, 0.005)
    cos, sin = np.cos(finger.angle), np.sin(finger.angle)
    return cos * x + sin * y, -sin * x + cos * y


def _phase(pattern: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return the ridge phase field of a pattern class, in image heights."""
    radius = np.hypot(x, y)
    if pattern == "whorl":
        return radius
    if pattern == "twin_loop":
        return np.minimum(np.hypot(x - 0.08, y + 0.05), np.hypot(x + 0.08, y - 0.05))
    if pattern == "arch":
        return y + 0.2 * np.exp(-(x**2) / 0.05)
    if pattern == "tented_arch":
        return y + 0.3 * np.exp(-np.abs(x) / 0.06)
    slant = 0.8 if pattern == "left_loop" else -0.8
    shifted = x + slant * np.clip(y, 0, None)
    return np.where(y < 0, radius, np.abs(shifted))


def _ellipse(rng: np.random.Generator, scale: float) -> np.ndarray:
    height, width = DEMO_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(float)
    center_y = height / 2 + rng.uniform(-0.1, 0.1) * height
    center_x = width / 2 + rng.uniform(-0.1, 0.1) * width
    radius_y = scale * height * rng.uniform(0.85, 1.0) / 2
    radius_x = scale * width * rng.uniform(0.8, 1.0) / 2
    inside = ((y - center_y) / radius_y) ** 2 + ((x - center_x) / radius_x) ** 2 <= 1
    return inside.astype(np.uint8)


def _ridges(finger: _Finger, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(rng, finger)
    phase = _phase(FINGERPRINT_CLASSES[finger.pattern], x, y)
    return 0.5 + 0.5 * np.cos(2 * np.pi * finger.frequency * phase)


def _draw_fingerprint(finger: _Finger, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = _ellipse(rng, scale=0.9)
    ridges = _ridges(finger, rng)
    image = np.where(mask > 0, 235 - 190 * ridges, 235) + rng.normal(0, 8, ridges.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _draw_latent(finger: _Finger, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = _ellipse(rng, scale=rng.uniform(0.45, 0.7))
    ridges = _ridges(finger, rng)
    clutter = np.kron(rng.uniform(90, 200, size=(12, 10)), np.ones((8, 8)))
    clutter = clutter[: DEMO_SIZE[0], : DEMO_SIZE[1]]
    image = np.where(mask > 0, clutter - 70 * ridges, clutter) + rng.normal(0, 15, ridges.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask
