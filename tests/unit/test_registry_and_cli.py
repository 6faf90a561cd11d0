"""Registries, entry-point discovery and the CLI skeleton."""

import subprocess
import sys

import pytest

from flowvid.cli import main
from flowvid.registry import BLOCKS, Registry


def test_entry_point_plugin_is_discovered_with_its_package():
    entry = {e.name: e for e in BLOCKS}["gated"]
    assert entry.class_path == "flowvid_plugins.blocks.GatedAffineBlock"
    assert entry.package == "flowvid" and entry.version != "unknown"


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="affine"):
        BLOCKS.get("no-such-block")


def test_a_name_cannot_be_taken_twice():
    registry = Registry("thing", "flowvid.things")
    registry.add("a", int)
    registry.add("a", int)  # the same object again is fine
    with pytest.raises(ValueError, match="taken"):
        registry.add("a", float)


def test_plugins_command_lists_builtin_and_plugin_blocks():
    out = subprocess.run([sys.executable, "-m", "flowvid.cli", "plugins"], capture_output=True, text=True, check=True)
    assert "affine" in out.stdout and "gated" in out.stdout and "GatedAffineBlock" in out.stdout


def test_unknown_command_is_one_line_and_nonzero(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command" in err and "Traceback" not in err


def test_help_lists_every_command_with_what_it_does(capsys):
    from flowvid.cli import LIGHTNING_VERBS, VERBS

    assert main(["--help"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert listed == {*LIGHTNING_VERBS, *VERBS}


def test_version_names_flowvid_and_the_libraries_behind_its_numbers(capsys):
    from importlib.metadata import version

    import torch

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"flowvid {version('flowvid')} (torch {torch.__version__}, lightning ") and "Python 3." in out


def test_plugins_help_explains_instead_of_listing(capsys):
    assert main(["plugins", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: flowvid plugins")
    assert main(["plugins", "--bogus"]) == 2


class FakeEntryPoint:
    def __init__(self, name, obj):
        self.name, self.value, self.obj = name, f"fake:{name}", obj

    def load(self):
        return self.obj


def test_a_plugin_that_takes_a_taken_name_is_a_warning_and_the_others_still_load(monkeypatch):
    import flowvid.registry as registry_module

    class Clash:
        pass

    class Fine:
        pass

    fakes = [FakeEntryPoint("affine", Clash), FakeEntryPoint("fine-block", Fine)]
    monkeypatch.setattr(registry_module.metadata, "entry_points",
                        lambda group: fakes if group == BLOCKS.group else [])
    monkeypatch.setattr(registry_module, "_loaded", False)
    monkeypatch.setattr(BLOCKS, "_entries", dict(BLOCKS._entries))  # restored after the test
    with pytest.warns(UserWarning, match="could not load block plugin 'affine'.*taken"):
        registry_module.load_plugins()
    assert BLOCKS.get("affine").__name__ == "AffineBlock" and BLOCKS.get("fine-block") is Fine
