"""``flowvid data`` lists its tools without importing them, and runs one importing only its own module."""

import importlib
import subprocess
import sys

import pytest

from data_tools.cli import VERBS, build_parser

LISTING_AND_HELP = """
import sys
from flowvid.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(sorted(name for name in sys.modules if name.split(".")[0] in ("lightning", "data_tools")
             or name.startswith("flowvid.lit") or name == "flowvid.data.datamodule"))
"""


def modules_imported_by(argv: list[str]) -> list[str]:
    run = subprocess.run([sys.executable, "-c", LISTING_AND_HELP.format(argv=argv)], capture_output=True, text=True,
                         check=True)
    return eval(run.stdout.strip().splitlines()[-1])


def test_listing_the_data_tools_imports_none_of_them_nor_lightning():
    assert modules_imported_by(["data", "--help"]) == ["data_tools", "data_tools.cli", "data_tools.report"]


def test_a_data_tool_imports_its_own_module_and_not_lightning():
    imported = modules_imported_by(["data", "verify", "--help"])
    assert "data_tools.verify" in imported
    assert not [name for name in imported if name.startswith(("lightning", "flowvid.lit", "flowvid.data.datamodule"))]
    assert not {f"data_tools.{name}" for name in ("from_videos", "encode_latents", "fvd")} & set(imported)


@pytest.mark.parametrize("verb", list(VERBS))
def test_each_listed_summary_is_the_first_line_of_its_tools_docstring(verb):
    module_name, summary = VERBS[verb]
    first_line = importlib.import_module(module_name).__doc__.strip().split("\n")[0]
    assert first_line == f"``{verb}``: {summary}"


def test_the_full_parser_knows_every_tools_options():
    verbs = next(action for action in build_parser()._actions if action.dest == "verb")
    assert set(verbs.choices) == set(VERBS)
    assert all(parser._actions[1:] for parser in verbs.choices.values())  # more than -h
