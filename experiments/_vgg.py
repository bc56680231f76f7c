"""VGG-style model pieces: a conv encoder, a SegNet-style decoder and dense task branches.

The encoder stacks stages of 3x3 convolutions, each stage closed by a 2x2 max pool that also
returns its indices. The decoder mirrors it with max-unpooling at those indices, as SegNet
does (V. Badrinarayanan, A. Kendall, R. Cipolla, "SegNet: A Deep Convolutional
Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017). Every piece counts its
layers in ``n_layers``, so an experiment can give each task its DST depth.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

_logger = logging.getLogger(__name__)


@dataclass
class EncoderFeatures:
    """Output of :class:`VGGEncoder`: the last feature map and what the decoder needs.

    Attributes:
        features: Feature map after the last pool, ``(batch, channels, height, width)``.
        indices: Max-pool indices of every stage, first stage first.
        sizes: Input size of every pool, first stage first, to undo odd sizes exactly.
    """

    features: Tensor
    indices: list[Tensor]
    sizes: list[tuple[int, ...]]


def conv_layer(in_channels: int, out_channels: int) -> nn.Sequential:
    """Return a 3x3 convolution with padding 1, batch normalisation and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class VGGEncoder(nn.Module):
    """Stages of 3x3 convolutions, each followed by a 2x2 max pool that keeps its indices.

    Args:
        in_channels: Channels of the input image.
        stages: Output channels of each convolution, one sequence per stage. For instance
            ``[(16, 16), (32, 32)]`` is two stages of two convolutions each.
    """

    def __init__(self, in_channels: int, stages: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if not stages or not all(stages):
            raise ValueError(f"every encoder stage needs at least one convolution, got {stages}")
        self.stage_channels = [list(stage) for stage in stages]
        self.stages = nn.ModuleList()
        channels = in_channels
        for stage in self.stage_channels:
            layers = []
            for out_channels in stage:
                layers.append(conv_layer(channels, out_channels))
                channels = out_channels
            self.stages.append(nn.Sequential(*layers))
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.in_channels = in_channels
        self.out_channels = channels

    @property
    def n_layers(self) -> int:
        """Number of convolutions."""
        return sum(len(stage) for stage in self.stage_channels)

    def forward(self, inputs: Tensor) -> EncoderFeatures:
        indices, sizes = [], []
        features = inputs
        for stage in self.stages:
            features = stage(features)
            sizes.append(tuple(features.shape))
            features, stage_indices = self.pool(features)
            indices.append(stage_indices)
        return EncoderFeatures(features, indices, sizes)


class SegNetDecoder(nn.Module):
    """The mirror of a :class:`VGGEncoder`: max-unpooling, then the stage's convolutions.

    The last convolution maps to ``out_channels`` with no normalisation or activation, so
    the output is a dense regression or a map of logits.
    """

    def __init__(self, encoder: VGGEncoder, out_channels: int) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        self.stages = nn.ModuleList()
        # Encoder convolution j maps channels[j] to channels[j + 1], and its mirror maps back.
        channels = [encoder.in_channels] + [c for stage in encoder.stage_channels for c in stage]
        position = len(channels) - 1
        for stage in reversed(encoder.stage_channels):
            layers: list[nn.Module] = []
            for _ in stage:
                position -= 1
                if position == 0:
                    layers.append(nn.Conv2d(channels[1], out_channels, kernel_size=3, padding=1))
                else:
                    layers.append(conv_layer(channels[position + 1], channels[position]))
            self.stages.append(nn.Sequential(*layers))
        self._n_layers = encoder.n_layers

    @property
    def n_layers(self) -> int:
        """Number of convolutions, equal to the encoder's."""
        return self._n_layers

    def forward(self, encoded: EncoderFeatures) -> Tensor:
        outputs = encoded.features
        pools = zip(reversed(encoded.indices), reversed(encoded.sizes), strict=True)
        for stage, (indices, size) in zip(self.stages, pools, strict=True):
            outputs = self.unpool(outputs, indices, output_size=size[-2:])
            outputs = stage(outputs)
        return outputs


class DenseBranch(nn.Module):
    """A task branch of fully connected layers over the flattened encoder features.

    Args:
        in_features: Number of values in the flattened input.
        hidden_features: Width of each hidden layer. ``n_layers`` is their count plus one.
        out_features: Number of outputs of the last layer, which has no activation.
        dropout: Dropout probability before every hidden layer after the first.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        out_features: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for position, hidden in enumerate(hidden_features):
            if dropout > 0 and position > 0:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)
        self.n_layers = len(hidden_features) + 1

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class EncoderHead(nn.Module):
    """A head that reads the last encoder feature map of :class:`EncoderFeatures`."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, encoded: EncoderFeatures) -> Tensor:
        return self.branch(encoded.features)
