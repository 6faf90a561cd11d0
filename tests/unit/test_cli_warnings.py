"""How `flowvid` prints warnings: one line each, without Python's file, line and source line; and what the
learned text encoder's warning of unknown words says in training and when sampling."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest

from flowvid import cli
from flowvid.text import LearnedTextEncoder
from test_product_generate_score import checkpoint  # noqa: F401 (a fixture)

WARNS_FROM_LIBRARY_CODE = """
import sys
from lightning.pytorch.utilities import rank_zero_warn
from flowvid.cli import VERBS, main

def warning_verb(argv):
    rank_zero_warn("validation reads\\nno shards")
    return 0

VERBS["warn"] = warning_verb
sys.exit(main(["warn"]))
"""


def run_python(args: list[str], **environment: str) -> subprocess.CompletedProcess:
    """Python on ``args`` in a process of its own: warnings print only outside pytest's recording of them."""
    env = {name: value for name, value in os.environ.items() if name != "FLOWVID_TRACEBACK"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**env, **environment},
                          timeout=300)


def test_generate_prints_the_unknown_words_warning_as_one_line_of_flowvid(checkpoint, tmp_path):
    done = run_python(["-m", "flowvid.cli", "generate", "--ckpt", str(checkpoint), "--out", str(tmp_path / "out"),
                       "--prompt", "a purple circle spins"])
    assert done.returncode == 0, done.stderr
    [warned] = [line for line in done.stderr.splitlines() if "<unk>" in line]
    assert warned.startswith("flowvid: warning: LearnedTextEncoder: the model never learned 2 word(s) "
                             "of the text it was given ('purple', 'spins')")
    assert "flowvid data vocabulary" not in warned and "use words of its training captions" in warned
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr and "forward_call" not in done.stderr


def test_a_warning_of_a_library_is_the_message_alone_after_the_programs_name():
    done = run_python(["-c", WARNS_FROM_LIBRARY_CODE])
    assert done.returncode == 0, done.stderr
    assert done.stderr == "flowvid: warning: validation reads\nno shards\n"


def test_flowvid_traceback_keeps_pythons_format_with_file_and_line():
    done = run_python(["-c", WARNS_FROM_LIBRARY_CODE], FLOWVID_TRACEBACK="1")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"<string>:\d+: UserWarning: validation reads\nno shards\n", done.stderr)


def test_the_console_format_holds_only_while_a_command_runs(monkeypatch):
    python_format = warnings.formatwarning
    seen: list[str] = []

    def verb(argv: list[str]) -> int:
        seen.append(warnings.formatwarning(UserWarning("careful"), UserWarning, "/somewhere/module.py", 7, "code()"))
        return 0

    monkeypatch.delenv("FLOWVID_TRACEBACK", raising=False)
    monkeypatch.setitem(cli.VERBS, "verb", verb)
    assert cli.main(["verb"]) == 0
    assert seen == ["flowvid: warning: careful\n"]
    assert warnings.formatwarning is python_format  # what importing flowvid gives Python users


def test_a_learned_encoder_in_training_says_how_to_make_the_words_known():
    encoder = LearnedTextEncoder(width=16, max_length=12, depth=1, head_dim=8).train()
    with pytest.warns(UserWarning, match=r"2 word\(s\) unknown to its vocabulary became <unk> \('dog', 'runs'\)") as got:
        encoder(["a dog runs"])
    assert "`flowvid data vocabulary DIR`" in str(got[0].message)


def test_a_trained_encoder_says_it_never_learned_the_words_and_offers_no_training_fix():
    encoder = LearnedTextEncoder(width=16, max_length=12, depth=1, head_dim=8).eval()
    with pytest.warns(UserWarning, match=r"never learned 2 word\(s\) .*\('dog', 'runs'\): they read as <unk>") as got:
        encoder(["a dog runs", "a red circle"])
    said = str(got[0].message)
    assert "training captions" in said and "flowvid data vocabulary" not in said
    assert encoder.unknown_count == 2
