"""The demo's training step starts a fresh run in its output folder."""

import subprocess

from flowvid import demo


def test_a_second_demo_run_replaces_the_checkpoints_of_the_first(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    old = run_dir / "checkpoints" / "step=00000640.ckpt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"first run")

    def fake_fit(command, check):
        # Lightning writes a -v1 name next to a checkpoint of the same step.
        name = "step=00000640-v1.ckpt" if old.exists() else "step=00000640.ckpt"
        (run_dir / "checkpoints" / name).write_bytes(b"second run")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(demo.subprocess, "run", fake_fit)
    checkpoint = demo.train("recipe.yaml", run_dir, [])
    assert checkpoint == old and checkpoint.read_bytes() == b"second run"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step=00000640.ckpt"]
