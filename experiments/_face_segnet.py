"""A VGG16-BN encoder that keeps its max-pool indices, and the SegNet decoder that uses them.

The encoder is torchvision's ``vgg16_bn`` feature extractor: 13 convolutions with batch norm
and ReLU in five blocks, each ending in a 2 by 2 max pool. Its pools here also return their
indices, so that the SegNet decoder (Badrinarayanan et al., "SegNet", TPAMI 2017) can undo
them with max-unpooling. The decoder mirrors the encoder with 13 more convolutions, so an
output of the decoder sits at depth 26 and a head on the encoder output at depth 13 plus its
own layers. The face and the fingerprint experiments build their models from these parts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models import vgg16_bn
from torchvision.models.vgg import cfgs, make_layers

from dst._errors import UsageError

_logger = logging.getLogger(__name__)

VGG16_CONFIG: list[int | str] = cfgs["D"]
"""Channels of the 13 convolutions of VGG16, with ``"M"`` for each max pool."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoded(NamedTuple):
    """Output of :class:`SegNetEncoder`: the last feature map and what unpooling needs."""

    features: Tensor
    indices: list[Tensor]
    sizes: list[torch.Size]

    def pooled(self) -> Tensor:
        """Return the global average of the feature map, ``(batch, channels)``."""
        return self.features.mean(dim=(2, 3))


class SegNetEncoder(nn.Module):
    """The VGG16-BN convolutions in five blocks whose max pools return their indices.

    Args:
        width_divisor: Divides every channel count of VGG16; 1 is the standard network.
        pretrained_path: A local file with torchvision's ImageNet ``vgg16_bn`` state dict
            (only with ``width_divisor=1``); None initialises at random.
    """

    def __init__(self, width_divisor: int = 1, pretrained_path: Path | None = None) -> None:
        super().__init__()
        if width_divisor == 1:
            network = vgg16_bn(weights=None)
            if pretrained_path is not None:
                _load_pretrained(network, Path(pretrained_path))
            features = network.features
        else:
            if pretrained_path is not None:
                raise UsageError(
                    "ImageNet weights need the full VGG16 width; drop pretrained_path or use"
                    " the 'paper' preset"
                )
            features = make_layers(scaled_config(width_divisor), batch_norm=True)
        self.blocks = nn.ModuleList(_split_blocks(features))
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.out_channels = block_channels(width_divisor)[-1][-1]

    def forward(self, images: Tensor) -> Encoded:
        indices, sizes = [], []
        features = images
        for block in self.blocks:
            features = block(features)
            sizes.append(features.shape)
            features, block_indices = self.pool(features)
            indices.append(block_indices)
        return Encoded(features, indices, sizes)


class SegNetDecoder(nn.Module):
    """Twelve of the 13 mirrored convolutions, each block after a max-unpool.

    The 13th convolution, which maps to the output channels, belongs to the task that uses
    the decoder, so several tasks can share this part.

    Args:
        width_divisor: The encoder's channel divisor.
    """

    def __init__(self, width_divisor: int = 1) -> None:
        super().__init__()
        channels = block_channels(width_divisor)
        blocks = []
        for index in reversed(range(len(channels))):
            block_out = channels[index - 1][-1] if index > 0 else channels[0][0]
            convolutions = [channels[index][-1]] * len(channels[index]) + [block_out]
            if index == 0:
                convolutions = convolutions[:-1]
            blocks.append(_conv_block(convolutions))
        self.blocks = nn.ModuleList(blocks)
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        self.out_channels = channels[0][0]

    def forward(self, encoded: Encoded) -> Tensor:
        features = encoded.features
        pairs = zip(reversed(encoded.indices), reversed(encoded.sizes), strict=True)
        for block, (indices, size) in zip(self.blocks, pairs, strict=True):
            features = self.unpool(features, indices, output_size=size[-2:])
            features = block(features)
        return features


class DenseHead(nn.Module):
    """Global average pooling of the encoder output, then four fully connected layers.

    Args:
        in_channels: Channels of the encoder output.
        out_features: Size of the output.
    """

    def __init__(self, in_channels: int, out_features: int) -> None:
        super().__init__()
        hidden = [max(8, in_channels // 2**step) for step in (1, 2, 3)]
        sizes = [in_channels, *hidden]
        layers: list[nn.Module] = []
        for in_size, out_size in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(in_size, out_size), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, encoded: Encoded) -> Tensor:
        return self.layers(encoded.pooled())


def block_channels(width_divisor: int) -> list[list[int]]:
    """Return the output channels of each convolution, grouped by encoder block."""
    blocks: list[list[int]] = [[]]
    for value in scaled_config(width_divisor):
        if value == "M":
            blocks.append([])
        else:
            blocks[-1].append(int(value))
    return blocks[:-1]


def scaled_config(width_divisor: int) -> list[int | str]:
    """Return the VGG16 layer list with every channel count divided by ``width_divisor``."""
    return [
        value if value == "M" else max(1, int(value) // width_divisor) for value in VGG16_CONFIG
    ]


def normalise_images(images: Tensor) -> Tensor:
    """Standardise ``[0, 1]`` RGB images with the ImageNet channel means and deviations."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype)
    return (images - mean[:, None, None]) / std[:, None, None]


def _conv_block(channels: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for in_channels, out_channels in zip(channels[:-1], channels[1:], strict=True):
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _split_blocks(features: nn.Sequential) -> list[nn.Sequential]:
    """Split torchvision's VGG feature layers at the max pools, dropping the pools."""
    blocks: list[list[nn.Module]] = [[]]
    for layer in features:
        if isinstance(layer, nn.MaxPool2d):
            blocks.append([])
        else:
            blocks[-1].append(layer)
    return [nn.Sequential(*layers) for layers in blocks if layers]


def _load_pretrained(network: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UsageError(
            f"pretrained_path {path} not found; give a local copy of torchvision's"
            " vgg16_bn ImageNet weights (vgg16_bn-6c64b313.pth) or leave it unset"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except (RuntimeError, KeyError, OSError, ValueError) as error:
        raise UsageError(
            f"cannot load VGG16-BN weights from {path}: {error}; use torchvision's"
            " vgg16_bn ImageNet state dict"
        ) from error
    _logger.info("loaded ImageNet VGG16-BN weights from %s", path)
