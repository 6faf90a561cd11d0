"""I3D (Inception-v1 inflated to 3-D, Kinetics-400): the network behind the standard FVD.

FVD takes the 400 Kinetics logits of every video, averaged over time. The network is written here as
a plain ``nn.Module`` whose parameter names match the converted TF-Hub weights that the common FVD
code bases load (``i3d_pretrained_400.pt``), so no TorchScript is involved. Preprocessing follows the
original pipeline: every frame resized to 224x224 (bilinear), then scaled to [-1, 1].

The weights are not shipped. Get the file once::

    wget https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt

and give its path as ``weights`` (``extractor_args: {weights: /path/i3d_pretrained_400.pt}`` in YAML).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowvid.checks import first_non_finite
from flowvid.files import read_torch_file
from flowvid.metrics.extractor import FVDExtractor, check_video, file_sha256, resized_frames, tf32_off
from flowvid.registry import FVD_EXTRACTORS

WEIGHTS_FILE = "i3d_pretrained_400.pt"
STANDARD_RESOLUTION = 224
WEIGHTS_URL = "https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt"
# Where the weights come from and what to do without them: said whether the file is missing or not given.
GET_WEIGHTS = (
    f"FVD needs the Kinetics-400 I3D converted from TF-Hub, the file {WEIGHTS_FILE} (about 50 MB) that the "
    f"common FVD code bases use: download it from {WEIGHTS_URL}"
)
WITHOUT_WEIGHTS = ("Without it, use the offline extractor 'inception-proxy' "
                   "(FVD-proxy, not comparable to published FVD).")

# Inception blocks: (name, output channels of the six convolutions): 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1.
_INCEPTION_BLOCKS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def same_padding(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """TensorFlow "SAME" padding for (T, H, W), in ``F.pad`` order (W first); odd totals pad more at the end."""
    pad: list[int] = []
    for length, k, s in reversed(list(zip(size, kernel, stride))):
        total = max((math.ceil(length / s) - 1) * s + k - length, 0)
        pad += [total // 2, total - total // 2]
    return pad


class Unit3D(nn.Module):
    """Convolution with "SAME" padding, batch norm (no scale in the original, so weight = 1) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), batch_norm: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=not batch_norm)
        # The TF original normalises with epsilon 1e-3 (Sonnet's default).
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max pooling with "SAME" padding; padded positions never win (they are -inf)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride), value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four parallel branches, concatenated along channels."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0])
        self.b1a = Unit3D(in_channels, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x)))
        return torch.cat(branches, dim=1)


class LogitsHead(nn.Module):
    """Average pooling over (2, 7, 7) windows with stride 1, a 1x1x1 convolution, then the mean over time.

    At the standard input (16 frames of 224x224) the last feature map is (2, 7, 7), so this is the
    original head. Smaller inputs (tests, short clips) pool over the whole spatial map and over
    at most 2 time steps, where the original would fail.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv3d = nn.Conv3d(in_channels, num_classes, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, height, width = x.shape[2:]
        x = F.avg_pool3d(x, (min(frames, 2), min(height, 7), min(width, 7)), stride=1)
        return self.conv3d(x).mean(dim=(2, 3, 4))


class InceptionI3D(nn.Sequential):
    """Inception-I3D for RGB input ``(B, 3, T, H, W)`` in [-1, 1] -> logits ``(B, num_classes)``.

    Submodule names are those of the converted Kinetics weights (``Conv3d_1a_7x7.conv3d.weight``,
    ``Mixed_4b.b1b.bn.running_var``, ``logits.conv3d.bias``, ...), so their state dict loads as is.
    """

    def __init__(self, num_classes: int = 400):
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            Conv3d_1a_7x7=Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
            MaxPool3d_2a_3x3=MaxPool3dSame((1, 3, 3), (1, 2, 2)),
            Conv3d_2b_1x1=Unit3D(64, 64),
            Conv3d_2c_3x3=Unit3D(64, 192, (3, 3, 3)),
            MaxPool3d_3a_3x3=MaxPool3dSame((1, 3, 3), (1, 2, 2)),
        )
        channels = 192
        for name, widths in _INCEPTION_BLOCKS.items():
            if name == "Mixed_4b":
                layers["MaxPool3d_4a_3x3"] = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                layers["MaxPool3d_5a_2x2"] = MaxPool3dSame((2, 2, 2), (2, 2, 2))
            layers[name] = block = InceptionBlock(channels, widths)
            channels = block.out_channels
        layers["logits"] = LogitsHead(channels, num_classes)
        super().__init__(layers)


@FVD_EXTRACTORS.register("i3d")
class I3DExtractor(FVDExtractor):
    """The standard FVD features: Kinetics-400 I3D logits (400-d) of 224x224 frames in [-1, 1].

    Args:
        weights: path to the converted TF-Hub weights ``i3d_pretrained_400.pt`` (see the module docstring);
            required (the default None only serves to say so, and where to get the file).
        resolution: side the frames are resized to; 224 is the standard protocol, smaller sizes are
            for tests only and are named in the protocol (``fvd/i3d-resolution32_...``).
    """

    feature_dim = 400
    family = "fvd"
    standard_settings = {"resolution": STANDARD_RESOLUTION}

    def __init__(self, weights: str | Path | None = None, resolution: int = STANDARD_RESOLUTION):
        super().__init__()
        if weights is None:
            raise FileNotFoundError(
                f"the i3d extractor needs its weights file, which is not shipped. {GET_WEIGHTS} and give its "
                f"path as `weights` (`--extractor-args '{{\"weights\": \"PATH\"}}'` on the command line, "
                f"`extractor_args: {{weights: PATH}}` in a config). {WITHOUT_WEIGHTS}"
            )
        self.weights_path = Path(weights).expanduser()
        self.resolution = int(resolution)
        self.network = InceptionI3D(num_classes=self.feature_dim)
        self.network.load_state_dict(load_i3d_weights(self.weights_path))
        self.network.eval().requires_grad_(False)

    @property
    def weights_hash(self) -> str:
        return file_sha256(self.weights_path)

    def settings(self) -> dict[str, int]:
        return {"resolution": self.resolution}

    def train(self, mode: bool = True) -> "I3DExtractor":
        super().train(mode)
        self.network.eval()  # batch statistics must never be updated
        return self

    def features(self, video: torch.Tensor) -> torch.Tensor:
        check_video(video)
        pixels = resized_frames(video, (self.resolution, self.resolution))
        scaled = (2 * pixels / 255 - 1).transpose(1, 2)  # (B, 3, T, H, W)
        with tf32_off():  # the standard features are fp32's, whatever GPU computes them
            return self.network(scaled)


def load_i3d_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, with a clear error when the file is missing or holds something else."""
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found at {path}. {GET_WEIGHTS} and pass its path as `weights`. "
                                f"{WITHOUT_WEIGHTS}")
    state = read_torch_file(path, "I3D weights", GET_WEIGHTS)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; expected the I3D weights {WEIGHTS_FILE}")
    expected = InceptionI3D().state_dict()
    # Files converted from TF have no batch-norm step counters; they do not change the forward pass.
    missing = sorted(k for k in expected.keys() - state.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} is not the Kinetics-400 I3D state dict {WEIGHTS_FILE}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}"
            + (" (and more)" if max(len(missing), len(unexpected), len(wrong_shape)) > 5 else "")
        )
    if (damaged := first_non_finite(state.items())) is not None:
        raise ValueError(f"{path} is damaged: {damaged} holds NaN or infinite values; {GET_WEIGHTS} again")
    return {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state}
