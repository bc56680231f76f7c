"""An in-memory multi-task data set and option checks shared by the built-in experiments."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dst._errors import UsageError

_logger = logging.getLogger(__name__)


class TensorTaskDataset(Dataset):
    """Samples held in tensors, with items ``(inputs, targets, mask)`` as the trainer reads them.

    Args:
        inputs: Input of every sample, indexed along the first dimension.
        targets: One tensor per task, each indexed along the first dimension.
        mask: Bool tensor ``(n_samples, n_tasks)``, true where a sample is labelled.
        transform: Function applied to each input as it is read, such as a conversion of
            stored ``uint8`` pixels to floats.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Sequence[Tensor],
        mask: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        n_samples = inputs.shape[0]
        if mask.shape != (n_samples, len(targets)):
            raise ValueError(
                f"mask must have shape ({n_samples}, {len(targets)}), got {tuple(mask.shape)}"
            )
        for index, target in enumerate(targets):
            if target.shape[0] != n_samples:
                raise ValueError(
                    f"target {index} has {target.shape[0]} samples but the inputs have {n_samples}"
                )
        self.inputs = inputs
        self.targets = list(targets)
        self.mask = mask.bool()
        self.transform = transform

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        inputs = self.inputs[index]
        if self.transform is not None:
            inputs = self.transform(inputs)
        return inputs, tuple(target[index] for target in self.targets), self.mask[index]


def check_int(options: dict[str, Any], name: str, minimum: int) -> int:
    """Return the option ``name`` as an int, raising UsageError unless it is at least ``minimum``.

    A string of digits, as a command line passes it, is accepted too.
    """
    value = options[name]
    number = _parse_number(value, int)
    if number is None or number < minimum:
        raise UsageError(f"invalid option {name}={value!r}; use an integer of {minimum} or more")
    return int(number)


def check_fraction(options: dict[str, Any], name: str) -> float:
    """Return the option ``name`` as a float, raising UsageError unless it is in (0, 1)."""
    value = options[name]
    number = _parse_number(value, float)
    if number is None or not 0 < number < 1:
        raise UsageError(
            f"invalid option {name}={value!r}; use a fraction between 0 and 1, such as 0.1"
        )
    return float(number)


def _parse_number(value: Any, kind: type[int] | type[float]) -> int | float | None:
    """Return ``value`` as a number of ``kind``, or None when it is not one."""
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind is int and not float(value).is_integer():
        return None
    return value


def derive_seed(seed: int, stream: str) -> int:
    """Return the seed of the random stream named ``stream`` of ``seed``.

    Generators seeded with the same integer produce the same numbers, so two draws seeded
    directly with one seed are correlated. Seeds derived for different stream names give
    independent streams.
    """
    entropy = [seed, zlib.crc32(stream.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def draw_labelled(n_samples: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Return a bool mask with exactly ``round(fraction * n_samples)`` true entries."""
    n_labelled = round(fraction * n_samples)
    order = torch.randperm(n_samples, generator=generator)
    mask = torch.zeros(n_samples, dtype=torch.bool)
    mask[order[:n_labelled]] = True
    return mask
