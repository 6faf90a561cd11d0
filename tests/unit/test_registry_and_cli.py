"""Registries, entry-point discovery and the CLI skeleton."""

import functools
import subprocess
import sys

import pytest

from flowvid.cli import main
from flowvid.registry import BLOCKS, Registry


def test_entry_point_plugin_is_discovered_with_its_package():
    entry = {e.name: e for e in BLOCKS}["gated"]
    assert entry.class_path == "flowvid_plugins.blocks.GatedAffineBlock"
    assert entry.package == "flowvid" and entry.version != "unknown"


def test_registering_reads_no_package_metadata_and_listing_reads_it_once(monkeypatch):
    """A scan of the installed distributions takes a tenth of a second; importing flowvid registers
    dozens of entries."""
    from flowvid import registry
    from flowvid.flows.permutations import Flip, Identity

    scans = []
    monkeypatch.setattr(registry.metadata, "packages_distributions",
                        lambda: scans.append("scan") or {"flowvid": ["flowvid"]})
    registry._distributions_by_package.cache_clear()
    registry._distribution_of.cache_clear()
    monkeypatch.setattr(registry, "load_plugins", lambda: None)
    try:
        things = Registry("thing", "flowvid.things")
        things.add("identity", Identity)
        things.add("flip", Flip)
        assert scans == []
        assert [entry.package for entry in things] == ["flowvid", "flowvid"]
        assert scans == ["scan"]
    finally:  # the caches must not keep what the fake scan found
        registry._distributions_by_package.cache_clear()
        registry._distribution_of.cache_clear()


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
    from flowvid.flows import FlowBlock

    class Clash(FlowBlock):
        pass

    class Fine(FlowBlock):
        pass

    fakes = [FakeEntryPoint("affine", Clash), FakeEntryPoint("fine-block", Fine)]
    monkeypatch.setattr(registry_module.metadata, "entry_points",
                        lambda group: fakes if group == BLOCKS.group else [])
    monkeypatch.setattr(registry_module, "_loaded", False)
    monkeypatch.setattr(BLOCKS, "_entries", dict(BLOCKS._entries))  # restored after the test
    with pytest.warns(UserWarning, match="could not load block plugin 'affine'.*taken"):
        registry_module.load_plugins()
    assert BLOCKS.get("affine").__name__ == "AffineBlock" and BLOCKS.get("fine-block") is Fine


def test_an_installed_plugin_keeps_its_name_against_a_register_call_made_before_any_look_up(monkeypatch):
    import flowvid.registry as registry_module
    from flowvid.flows import FlowBlock

    class Installed(FlowBlock):
        pass

    class Registered(FlowBlock):
        pass

    monkeypatch.setattr(registry_module.metadata, "entry_points",
                        lambda group: [FakeEntryPoint("wide-mlp", Installed)] if group == BLOCKS.group else [])
    monkeypatch.setattr(registry_module, "_loaded", False)
    monkeypatch.setattr(BLOCKS, "_entries", dict(BLOCKS._entries))  # restored after the test
    with pytest.raises(ValueError, match="block name 'wide-mlp' is taken by .*Installed"):
        BLOCKS.register("wide-mlp")(Registered)
    assert BLOCKS.get("wide-mlp") is Installed


def test_a_misspelt_entry_point_group_is_named_where_its_plugin_is_looked_for(monkeypatch, capsys):
    import importlib.metadata as metadata

    import flowvid.registry as registry_module
    from flowvid.cli import main

    misspelt = metadata.EntryPoints([metadata.EntryPoint("tg", "my_blocks.blocks:TGBlock", "flowvid.block")])
    monkeypatch.setattr(registry_module.metadata, "entry_points", lambda: misspelt)
    monkeypatch.setattr(registry_module, "_loaded", True)
    note = ("a package declares 'tg' in the entry-point group 'flowvid.block', which flowvid does not read (did "
            "you mean 'flowvid.blocks'?)")
    with pytest.raises(KeyError) as unknown:
        BLOCKS.get("tg")
    assert str(unknown.value).endswith(f"; {note}")
    assert main(["plugins"]) == 0
    assert f"warning {note}" in " ".join(capsys.readouterr().out.split())


def test_a_plugin_that_fails_to_import_is_named_as_such_when_asked_for(monkeypatch):
    import flowvid.registry as registry_module

    class Broken(FakeEntryPoint):
        def load(self):
            raise ImportError("No module named 'missing_dependency'")

    monkeypatch.setattr(registry_module.metadata, "entry_points",
                        lambda group: [Broken("broken", None)] if group == BLOCKS.group else [])
    monkeypatch.setattr(registry_module, "_loaded", False)
    monkeypatch.setattr(BLOCKS, "_failed", {})
    with pytest.warns(UserWarning, match="could not load block plugin 'broken'"):
        registry_module.load_plugins()
    with pytest.raises(KeyError, match="block 'broken' is installed by an unknown package .fake:broken. but could "
                                       "not be loaded: No module named 'missing_dependency'"):
        BLOCKS.get("broken")


def test_a_factory_plugin_is_listed_by_what_it_calls():
    from flowvid.codecs import PixelCodec

    things = Registry("thing", "flowvid.things")
    things.add("pixel2", functools.partial(PixelCodec, patch_size=2))
    [entry] = list(things._entries.values())
    assert entry.class_path == "functools.partial(flowvid.codecs.pixel.PixelCodec, ...)"
    assert entry.package == "flowvid"


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    from flowvid.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_videos=2, frames=2, size=16, val_videos=1)
    return root / "train"


def test_an_unknown_name_prints_without_quotes_and_is_still_a_key_error():
    with pytest.raises(KeyError) as caught:
        BLOCKS.get("no-such-block")
    assert str(caught.value).startswith("unknown block 'no-such-block'; registered: ")


def test_an_unknown_name_on_the_data_command_line_is_one_plain_line(raw_folder, capsys):
    from data_tools.cli import main as data_main

    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "nosuch"]) == 2
    out = capsys.readouterr().err
    assert "error: unknown FVD extractor 'nosuch'" in " ".join(out.split()) and '"' not in out


def test_a_missing_file_on_the_data_command_line_is_just_its_cause(raw_folder, tmp_path, capsys):
    from data_tools.cli import main as data_main

    raw = raw_folder
    missing = tmp_path / "nope.pt"
    code = data_main(["encode-latents", str(raw), "--out", str(tmp_path / "lat"), "--codec", "video_vae",
                      "--codec-args", f'{{"checkpoint": "{missing}"}}'])
    out = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert out.startswith(f"flowvid data encode-latents: error: VideoVAE checkpoint {missing} does not exist")
    assert "cannot write or read" not in out


def test_arguments_to_a_module_without_its_own_init_are_refused_up_front():
    import torch

    from flowvid.registry import check_arguments

    class NoInit(torch.nn.Module):
        pass

    class Plain:
        pass

    for factory in (NoInit, Plain):
        check_arguments("thing 'x'", factory, {}, "--x-args")  # no arguments: fine
        with pytest.raises(ValueError, match=r"^thing 'x' takes no arguments, got 'weights' \(in --x-args\)$"):
            check_arguments("thing 'x'", factory, {"weights": "w.pt"}, "--x-args")


def test_extractor_arguments_the_pixel_stats_extractor_does_not_take_are_one_line(raw_folder, capsys):
    from data_tools.cli import main as data_main

    code = data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats",
                      "--extractor-args", '{"weights": "x"}'])
    out = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "error: FVD extractor 'pixel-stats' takes no arguments, got 'weights'" in out


def test_yaml_takes_class_names_for_codecs_and_short_names_for_blocks_as_the_docs_say(tmp_path, capsys):
    from pathlib import Path

    import yaml

    import flowvid.cli

    root = Path(__file__).resolve().parents[2]
    demo = root / "recipes" / "demo" / "shapes_t2v.yaml"
    works = tmp_path / "class_names.yaml"
    works.write_text("model:\n  init_args:\n    codec: {class_path: PixelCodec}\n"
                     "    text_encoder: {class_path: LearnedTextEncoder}\n"
                     "    flow: {init_args: {deep_block: gated}}\n"
                     "data: {class_path: VideoShardDataModule}\n")
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(demo), "--config", str(works), "--print_config"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    config = yaml.safe_load(out[out.index("# lightning.pytorch"):])
    assert config["model"]["init_args"]["codec"]["class_path"] == "flowvid.codecs.PixelCodec"
    assert config["model"]["init_args"]["flow"]["init_args"]["deep_block"] == "gated"

    refused = tmp_path / "short_name.yaml"
    refused.write_text("model:\n  init_args:\n    codec: {class_path: pixel}\n")
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(demo), "--config", str(refused), "--print_config"])
    assert stop.value.code not in (0, None)

    # ... and the docs no longer promise short names in class_path for them.
    assert "by short name or by `class_path`" not in (root / "docs" / "codecs_and_text.md").read_text()
    assert "by short name or `class_path`" not in (root / "docs" / "plugins.md").read_text()
    assert "class by its short name." not in flowvid.cli.__doc__
    assert "`class_path: pixel` is refused" in (root / "docs" / "plugins.md").read_text()


# --- how `flowvid fit` ends -------------------------------------------------------------------------

#: The demo recipe at the smallest sizes, checkpointed after every step, without validation and sampling.
TINY_FIT = """
trainer:
  max_steps: 2
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: flowvid.lit.checkpointing.RunCheckpoint
      init_args: {every_n_train_steps: 1, keep_last_k: -1}
model:
  init_args:
    warmup_steps: 1
    flow:
      init_args: {num_shallow: 1, shallow_width: 32, shallow_depth: 1, deep_width: 32, deep_depth: 1, head_dim: 16,
                  text_width: 16}
    text_encoder: {init_args: {width: 16, depth: 1, head_dim: 8}}
    denoiser: {init_args: {width: 16, depth: 1, head_dim: 8, text_width: 16}}
data: {init_args: {batch_size: 2, val_batches: 1}}
"""


def test_fit_ends_with_its_newest_checkpoint_its_logs_and_the_commands_that_take_it_on(tmp_path, capsys):
    from pathlib import Path
    from unittest import mock

    from flowvid.data import write_synthetic_dataset
    from flowvid.lit.checkpointing import list_checkpoints

    write_synthetic_dataset(tmp_path / "shapes", num_videos=4, frames=8, size=16, val_videos=2)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY_FIT)
    demo = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"
    run = tmp_path / "run"
    with mock.patch.object(sys, "argv", ["flowvid"]):  # pytest's own arguments are not the CLI's
        status = main(["fit", "--config", str(demo), "--config", str(tiny), f"--trainer.default_root_dir={run}",
                       f"--data.init_args.train_dir={tmp_path / 'shapes' / 'train'}",
                       f"--data.init_args.val_dir={tmp_path / 'shapes' / 'val'}"])
    assert status == 0
    summary, rest = capsys.readouterr().out.split("trained to step 2; saved ", 1)[1].split(", logs in ", 1)
    logs, _, commands = rest.partition("\n")
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert newest.name == "step=00000002.ckpt" and Path(summary).resolve() == newest.resolve()
    assert Path(logs).is_dir() and Path(logs).parent == run / "lightning_logs"
    assert commands.splitlines() == [
        "next:",
        f"  flowvid export --ckpt {summary} --out {run / 'exported' / 'model.safetensors'}",
        f'  flowvid generate --ckpt {summary} --prompt "..." --out {run / "samples"}',
        f"  tensorboard --logdir {run / 'lightning_logs'}",
    ]


def test_only_the_first_process_of_a_run_says_how_it_ended(capsys):
    from types import SimpleNamespace

    from torch import nn

    from flowvid.lit.checkpointing import RunCheckpoint
    from flowvid.lit.cli_support import FitSummary

    checkpoints = RunCheckpoint()
    checkpoints._last_checkpoint_saved = "/runs/a/checkpoints/step=00000007.ckpt"

    def process(rank: int) -> SimpleNamespace:
        return SimpleNamespace(is_global_zero=rank == 0, global_step=7, checkpoint_callbacks=[checkpoints],
                               loggers=[], default_root_dir="/runs/a", callback_metrics={}, datamodule=None)

    for rank in (1, 0):
        summary = FitSummary()
        summary.on_train_start(process(rank), nn.Linear(1, 1))
        summary.on_fit_end(process(rank), nn.Linear(1, 1))
        if rank == 1:
            assert capsys.readouterr().out == ""
    assert capsys.readouterr().out.startswith("trained to step 7; saved /runs/a/checkpoints/step=00000007.ckpt\n")
