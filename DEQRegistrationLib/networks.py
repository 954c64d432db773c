"""The update network: a small VoxelMorph-style U-Net, 2D or 3D.

One definition serves every method (DEQReg, unrolling, RIIR, GraDIRN, one-step
VoxelMorph) so comparisons differ only in how the network is used.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv(ndim: int):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


class ConvBlock(nn.Module):
    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = _conv(ndim)(cin, cout, 3, stride=stride, padding=1)

    def forward(self, x):
        return F.leaky_relu(self.conv(x), 0.2)


class UNet(nn.Module):
    """Encoder with strided convolutions, decoder with upsampling and skips.

    Input sizes must be divisible by ``2 ** len(enc)`` (``multiple``); the
    registration pipeline pads to that. The flow head starts near zero, so an
    untrained residual update is close to the identity map.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int,
                 enc: Sequence[int] = (16, 32, 32), dec: Sequence[int] = (32, 32, 16), final_init: float = 1e-5):
        super().__init__()
        if len(dec) != len(enc):
            raise ValueError("dec must have one entry per encoder level")
        self.ndim = ndim
        self.config = dict(ndim=ndim, in_channels=in_channels, out_channels=out_channels,
                           enc=list(enc), dec=list(dec), final_init=final_init)
        self.stem = ConvBlock(ndim, in_channels, enc[0])
        self.down = nn.ModuleList()
        prev = enc[0]
        for c in enc:
            self.down.append(ConvBlock(ndim, prev, c, stride=2))
            prev = c
        skips = [enc[0]] + list(enc[:-1])
        self.up = nn.ModuleList()
        for c, skip in zip(dec, reversed(skips)):
            self.up.append(ConvBlock(ndim, prev + skip, c))
            prev = c
        self.head = _conv(ndim)(prev, out_channels, 3, padding=1)
        nn.init.normal_(self.head.weight, 0.0, final_init)
        nn.init.zeros_(self.head.bias)

    @property
    def multiple(self) -> int:
        return 2 ** len(self.down)

    def forward(self, x):
        x = self.stem(x)
        skips = [x]
        for d in self.down:
            x = d(x)
            skips.append(x)
        skips.pop()  # the bottleneck is x itself
        mode = "trilinear" if self.ndim == 3 else "bilinear"
        for u in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=False)
            x = u(torch.cat([x, skip], dim=1))
        return self.head(x)


class ConvNet(nn.Module):
    """A plain full-resolution CNN: ``layers`` 3^ndim convolutions of ``channels``
    (leaky ReLU 0.2 between them), the last one to ``out_channels``.

    GraDIRN's regulariser network (5 layers of 32 channels, no down-sampling).
    The last layer starts near zero, as the U-Net's head does.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, layers: int = 5, channels: int = 32,
                 final_init: float = 1e-5):
        super().__init__()
        if layers < 2:
            raise ValueError("a ConvNet needs at least 2 layers")
        self.ndim = ndim
        self.config = dict(ndim=ndim, in_channels=in_channels, out_channels=out_channels, layers=layers,
                           channels=channels, final_init=final_init)
        blocks = [ConvBlock(ndim, in_channels, channels)]
        blocks += [ConvBlock(ndim, channels, channels) for _ in range(layers - 2)]
        self.body = nn.Sequential(*blocks)
        self.head = _conv(ndim)(channels, out_channels, 3, padding=1)
        nn.init.normal_(self.head.weight, 0.0, final_init)
        nn.init.zeros_(self.head.bias)

    multiple = 1

    def forward(self, x):
        return self.head(self.body(x))


class FeatureNet(nn.Module):
    """phi, the ``features`` update's siamese feature CNN (a learned similarity, as MIND is a fixed one).

    ``layers`` 3^ndim convolutions of ``channels`` (leaky ReLU 0.2 between them; the i-th dilated by
    ``dilations[i]``, replicate padding), the last to ``out_channels`` features, then ``activation``: "none" or
    "softmax" over the channels (a phi pretrained as a segmentation network; ``logits`` gives the values before
    it). Full resolution, so that features stay aligned with the image they are sampled from. The head starts
    as ``normal(0, final_init)``, not near zero: the features' weight in the operator (beta, starting at 0) then
    gets a gradient from the first training step.
    """

    def __init__(self, ndim: int, in_channels: int = 1, out_channels: int = 4, layers: int = 4, channels: int = 16,
                 final_init: float = 1.0, activation: str = "none", dilations=None):
        super().__init__()
        if layers < 2:
            raise ValueError("a FeatureNet needs at least 2 layers")
        if activation not in ("none", "softmax"):
            raise ValueError(f"activation must be none or softmax, got {activation!r}")
        dil = [1] * layers if dilations is None else [int(d) for d in dilations]
        if len(dil) != layers:
            raise ValueError("dilations needs one entry per layer")
        self.ndim = ndim
        self.config = dict(ndim=ndim, in_channels=in_channels, out_channels=out_channels, layers=layers,
                           channels=channels, final_init=final_init, activation=activation, dilations=dil)
        conv = _conv(ndim)
        self.body = nn.ModuleList([conv(in_channels if i == 0 else channels, channels, 3, padding=dil[i],
                                        dilation=dil[i], padding_mode="replicate") for i in range(layers - 1)])
        self.head = conv(channels, out_channels, 3, padding=dil[-1], dilation=dil[-1], padding_mode="replicate")
        nn.init.normal_(self.head.weight, 0.0, final_init)
        nn.init.zeros_(self.head.bias)

    multiple = 1

    def logits(self, x):
        for c in self.body:
            x = F.leaky_relu(c(x), 0.2)
        return self.head(x)

    def forward(self, x):
        y = self.logits(x)
        return torch.softmax(y, 1) if self.config["activation"] == "softmax" else y


def build_network(spec: dict) -> nn.Module:
    """A network from its config: U-Net kwargs, or ``{"kind": "cnn", ...}`` for ConvNet."""
    spec = dict(spec)
    kind = spec.pop("kind", "unet")
    if kind == "unet":
        return UNet(**spec)
    if kind == "cnn":
        return ConvNet(**spec)
    raise ValueError(f"unknown network kind {kind!r}; choose unet or cnn")
