"""The building blocks of the original YOLOv5 repository's detectors, written for yoloslim.

Attribute names (conv, bn, act, cv1..cv4, m, add, d) and constructor arguments are those of the original modules,
because a checkpoint pickles each module's attributes by name and its state dict keys follow them: an unpickled
original module becomes one of these classes with its state intact. Forward passes compute what the original computes.

Conv, Bottleneck, C3, SPPF and Concat make up the releases v6.0 to v7.0; Focus, SPP and BottleneckCSP the earlier
layouts that checkpoints of those releases may still contain.
"""

from __future__ import annotations

import torch
from torch import nn


def same_padding(kernel: int, padding: int | None = None, dilation: int = 1) -> int:
    """The padding that keeps a stride-1 convolution's output the size of its input, unless one is given."""
    if padding is not None:
        return padding
    span = dilation * (kernel - 1) + 1
    return span // 2


class Conv(nn.Module):
    """Convolution without bias, BatchNorm, then SiLU (or the activation given; False for none)."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, same_padding(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if act is True:
            act = nn.SiLU()
        self.act = act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 Conv, added to the input when `shortcut` is set and the widths allow it."""

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """Two 1x1 branches, one through n Bottlenecks, concatenated and mixed by a third 1x1 Conv."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class BottleneckCSP(nn.Module):
    """The cross-stage-partial block of the earliest layouts: plain convolutions on both branches, then a shared
    BatchNorm and activation over their concatenation."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = nn.Conv2d(c1, hidden, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(hidden, hidden, 1, 1, bias=False)
        self.cv4 = Conv(2 * hidden, c2, 1, 1)
        self.bn = nn.BatchNorm2d(2 * hidden)
        self.act = nn.SiLU()
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        joined = torch.cat((self.cv3(self.m(self.cv1(x))), self.cv2(x)), 1)
        return self.cv4(self.act(self.bn(joined)))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: one max pool applied three times in a row, all four stages concatenated."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        stages = [self.cv1(x)]
        for _ in range(3):
            stages.append(self.m(stages[-1]))
        return self.cv2(torch.cat(stages, 1))


class SPP(nn.Module):
    """Spatial pyramid pooling of the earlier layouts: parallel max pools of several sizes, concatenated."""

    def __init__(self, c1, c2, k=(5, 9, 13)):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=size, stride=1, padding=size // 2) for size in k)

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x, *(pool(x) for pool in self.m)], 1))


class Focus(nn.Module):
    """The earlier layouts' stem: the four pixel phases of each 2x2 cell stacked as channels, then a Conv."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x):
        phases = (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])
        return self.conv(torch.cat(phases, 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along dimension `d`."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)
