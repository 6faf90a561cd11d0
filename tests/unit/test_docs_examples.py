"""Output shown in the user docs is the output the tools print."""

import re
from pathlib import Path

from data_tools.describe import main as describe_main
from flowvid.data.synthetic import write_synthetic_dataset

DOCS = Path(__file__).resolve().parents[2] / "docs"


def shown_output(doc: str, command: str) -> str:
    """The lines a doc's ```` ``` ```` block shows after ``$ command``."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    match = re.search(r"```\n\$ " + re.escape(command) + r"\n(.*?)```", text, re.S)
    assert match, f"docs/{doc} shows no output of `{command}`"
    return match.group(1)


def test_data_md_describe_example_matches_the_tool(tmp_path, monkeypatch, capsys):
    # The example describes the validation split of the demo's data (make-synthetic --num-videos 2048):
    # 256 held-out videos, which depend on the seed and their index alone, not on the training split.
    monkeypatch.chdir(tmp_path)
    write_synthetic_dataset("data/shapes", num_videos=8, val_videos=256, frames=8, size=16, seed=0,
                            max_objects=1, backgrounds=["plain"])
    capsys.readouterr()
    assert describe_main(["data/shapes/val", "--captions", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed == shown_output("data.md", "flowvid data describe data/shapes/val --captions 2")
