"""Ctrl-C during the demo's training: the training command saves its step, the demo ends in one line."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Stands in for `flowvid fit`: on a first Ctrl-C it saves a checkpoint after a while (a step in progress),
# then exits 130; a second Ctrl-C stops it at once, without saving.
FAKE_FIT = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    run_dir = Path(sys.argv[1])
    signals = []
    signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
    (run_dir / "ready").write_text("")
    while not signals:
        time.sleep(0.05)
    time.sleep(1.0)  # the step in progress
    if len(signals) > 1:
        sys.exit(1)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "step=00000007.ckpt").write_bytes(b"weights")
    sys.exit(130)
""")

# The demo with its data and training command replaced.
DEMO = textwrap.dedent("""
    import sys
    from flowvid import demo
    demo.make_data = lambda root: None
    demo.fit_command = lambda recipe, run_dir, extra: [sys.executable, "-c", sys.argv[1], str(run_dir)]
    sys.exit(demo.main(["--out", sys.argv[2]]))
""")


def start_demo(out: Path) -> subprocess.Popen:
    # A session of its own: a signal to its process group is what a terminal's Ctrl-C sends.
    demo = subprocess.Popen([sys.executable, "-c", DEMO, FAKE_FIT, str(out)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "run" / "ready").exists():
        if demo.poll() is not None or time.monotonic() > deadline:
            demo.kill()
            pytest.fail(f"the demo's training never started: {demo.communicate()}")
        time.sleep(0.05)
    return demo


@pytest.mark.parametrize("send", [lambda demo: os.killpg(demo.pid, signal.SIGINT),  # a terminal's Ctrl-C
                                  lambda demo: demo.send_signal(signal.SIGINT)])  # `kill -INT` of the demo alone
def test_ctrl_c_lets_training_save_then_ends_the_demo_in_one_line(tmp_path, send):
    demo = start_demo(tmp_path)
    send(demo)
    stdout, stderr = demo.communicate(timeout=120)
    saved = tmp_path / "run" / "checkpoints" / "step=00000007.ckpt"
    assert saved.exists()
    assert demo.returncode == 130
    assert "Traceback" not in stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith("python -m flowvid.demo: stopped by Ctrl-C during training;")
    assert f"the same command continues its training from the newest checkpoint, {saved}" in line


def test_a_second_ctrl_c_stops_at_once_and_the_demo_says_nothing_was_saved(tmp_path):
    demo = start_demo(tmp_path)
    os.killpg(demo.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(demo.pid, signal.SIGINT)
    stdout, stderr = demo.communicate(timeout=120)
    assert demo.returncode == 130
    assert not (tmp_path / "run" / "checkpoints").exists()
    [line] = stderr.strip().splitlines()
    assert line.endswith("no checkpoint was saved, so the same command trains afresh")


def test_a_stop_during_the_real_clips_fine_tuning_says_the_same_command_fine_tunes_afresh(tmp_path, monkeypatch,
                                                                                          capsys):
    from flowvid import demo, demo_real

    def stopped_while_fine_tuning(out, extra):
        raise demo.Stopped(signal.SIGINT)

    monkeypatch.setattr(demo_real, "check_inputs", lambda out: None)
    monkeypatch.setattr(demo_real, "run_demo_real", stopped_while_fine_tuning)
    with pytest.raises(SystemExit) as ended:
        demo.main(["--real", "--out", str(tmp_path)])
    assert ended.value.code == 130
    assert capsys.readouterr().err == ("python -m flowvid.demo: stopped by Ctrl-C during training; the same command "
                                       "fine-tunes the demo model afresh\n")
