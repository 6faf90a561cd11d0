"""encode-latents: the channel statistics of what is written, and the output folders it must not replace."""

import io
import json

import numpy as np
import pytest
import torch

from data_tools.cli import main as data_main
from data_tools.encode_latents import encode_latents
from data_tools.report import console
from flowvid.data import write_synthetic_dataset
from flowvid.data.shards import iter_tar
from processes import run_in_gloo_group
from test_data_encode_latents import SpaceToDepth, folder_contents


class NarrowAroundAnOffset(SpaceToDepth):
    """Latents of 0.1 plus a small spread: float16 rounds each of them by a visible share of that spread."""

    def encode(self, video):
        return super().encode(video) * 0.01 + 0.1


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_videos=12, frames=4, size=16, seed=3, shard_samples=5)
    return root / "train"


def written_latent_statistics(folder):
    """numpy's per-channel mean and std over every latent stored in ``folder``'s shards."""
    latents = [np.load(io.BytesIO(sample["latent.npy"]))
               for shard in sorted(folder.glob("shard-*.tar")) for sample in iter_tar(shard)]
    flat = np.stack(latents).astype(np.float64).reshape(-1, latents[0].shape[-1])
    return flat.mean(0), flat.std(0)


def assert_statistics_of_written_latents(manifest, folder):
    mean, std = written_latent_statistics(folder)
    np.testing.assert_allclose(manifest["latent_mean"], mean, rtol=1e-9, atol=0)
    np.testing.assert_allclose(manifest["latent_std"], std, rtol=1e-7, atol=0)


def test_channel_statistics_are_those_of_the_written_float16_latents(raw, tmp_path):
    manifest = encode_latents(raw, tmp_path / "latent", NarrowAroundAnOffset(), batch_size=5)
    assert_statistics_of_written_latents(manifest, tmp_path / "latent")


@pytest.mark.slow
def test_channel_statistics_merged_over_processes_one_of_them_empty(raw, tmp_path):
    # raw holds 3 shards: with 4 processes the last one encodes nothing.
    def encode(rank, _):
        torch.set_num_threads(1)
        return encode_latents(raw, tmp_path / "latent", NarrowAroundAnOffset(), batch_size=2, shard_samples=2)

    manifests = run_in_gloo_group(encode, tmp_path, world_size=4)
    assert manifests[0]["samples"] == 12 and all(m == manifests[0] for m in manifests)
    assert_statistics_of_written_latents(manifests[0], tmp_path / "latent")


@pytest.mark.parametrize("manifest_text, named", [
    ('{"tracks": ["a user\'s own manifest"]}', "is not a flowvid manifest"),
    (None, "holds raw shards"),
])
def test_an_output_folder_whose_manifest_latents_must_not_replace_is_refused(
    raw, tmp_path, capsys, monkeypatch, manifest_text, named
):
    monkeypatch.setattr(console, "width", 400)  # the message on one line
    out = tmp_path / "out"
    if manifest_text is None:  # another raw folder: its clips cannot be made again from latents
        write_synthetic_dataset(tmp_path / "other", num_videos=4, frames=4, size=16, seed=5, val_videos=1)
        out = tmp_path / "other" / "train"
    else:
        out.mkdir()
        (out / "manifest.json").write_text(manifest_text)
    before = folder_contents(out)
    code = data_main(["encode-latents", str(raw), "--out", str(out), "--codec", "test-space-to-depth"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("flowvid data encode-latents: error:") and error.count("\n") == 1, error
    assert named in error, error
    assert folder_contents(out) == before


def test_an_output_folder_of_earlier_latents_is_replaced(raw, tmp_path):
    out = tmp_path / "latent"
    encode_latents(raw, out, SpaceToDepth(scale=0.5))
    manifest = encode_latents(raw, out, SpaceToDepth())
    assert manifest["codec_config"] == {"scale": 1 / 255}
    assert json.loads((out / "manifest.json").read_text())["codec_config"] == manifest["codec_config"]
