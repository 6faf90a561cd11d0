"""Pieces of the real-data demo that run without a trained model."""

import numpy as np
import yaml

from flowvid.demo_real import ffv1_bits_per_dim, finetune_overlay, sample_clips


def test_ffv1_spends_few_bits_on_flat_frames_and_about_eight_on_noise():
    flat = np.full((8, 16, 16, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    assert ffv1_bits_per_dim(flat) < 2.0
    assert 7.5 < ffv1_bits_per_dim(noise) < 14.0


def test_finetune_overlay_points_at_the_real_shards_and_the_export(tmp_path):
    recipe = yaml.safe_load(finetune_overlay(tmp_path / "model.safetensors", tmp_path).read_text())
    assert recipe["data"]["init_args"]["train_dir"] == str(tmp_path / "shards" / "train")
    [init] = [c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("InitFromExport")]
    assert init["init_args"]["path"] == str(tmp_path / "model.safetensors")


def test_the_real_clips_are_installed():
    assert {p.name for p in sample_clips().glob("*.mp4")} >= {"bikes.mp4", "bigbuckbunny.mp4"}
