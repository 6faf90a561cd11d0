"""The examples of the user docs run as written, and the output they show is the output the tools print."""

import copy
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from setuptools import build_meta

from data_tools.describe import main as describe_main
from flowvid import registry
from flowvid.cli import main as cli_main
from flowvid.data.synthetic import write_synthetic_dataset
from flowvid.export import export_checkpoint
from flowvid.flows import GlobalLocalFlow
from flowvid.sampling import build_sampler
from test_product_generate_score import checkpoint  # noqa: F401 (a fixture)

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


def files_shown(doc: str) -> dict[str, str]:
    """The files a doc's code blocks show, by the path their first line names (``# my_blocks/blocks.py``)."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    blocks = re.findall(r"```\w+\n# ([\w./-]+)\n(.*?)```", text, re.S)
    return {path: body for path, body in blocks}


def write_files_shown(doc: str, folder: Path) -> None:
    """The files a doc's code blocks show, written under ``folder``, with the package's ``__init__.py``."""
    for path, body in files_shown(doc).items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(body, encoding="utf-8")
    (folder / "my_blocks" / "__init__.py").touch()


def forget_my_blocks():
    """Drop the doc's package from the imported modules: the next test imports the files it writes."""
    for module in [name for name in sys.modules if name.split(".")[0] == "my_blocks"]:
        del sys.modules[module]


def recipe_shown(doc: str, key: str) -> dict:
    """The first YAML block of a doc that writes ``key:``, parsed."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    recipe = next(block for block in re.findall(r"```yaml\n(.*?)```", text, re.S) if f"{key}:" in block)
    return yaml.safe_load(recipe)


@pytest.fixture
def installed_plugin_package(tmp_path, monkeypatch):
    """The plugin package docs/plugins.md writes, as `pip install -e .` leaves it: importable, with the
    entry points of its pyproject.toml; the registries are restored afterwards."""
    registry.load_plugins()  # the built-ins register on import: into the registries kept, not the test's copies
    write_files_shown("plugins.md", tmp_path)
    monkeypatch.chdir(tmp_path)
    build_meta.prepare_metadata_for_build_wheel(str(tmp_path))  # the .dist-info with the entry points
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    for kind in registry.REGISTRIES.values():
        monkeypatch.setattr(kind, "_entries", dict(kind._entries))
        monkeypatch.setattr(kind, "_failed", dict(kind._failed))
        monkeypatch.setattr(kind, "_claimed", dict(kind._claimed))
    forget_installed_packages()
    yield tmp_path
    forget_installed_packages()
    forget_my_blocks()


def forget_installed_packages():
    """Drop the cached map of installed packages, so that `flowvid plugins` names the package written here."""
    registry._distribution_of.cache_clear()
    registry._distributions_by_package.cache_clear()


def test_plugins_md_block_and_sampler_install_list_and_select(installed_plugin_package, capsys):
    from my_blocks.blocks import WideMLPBlock
    from my_blocks.samplers import CappedJacobiSampler

    assert cli_main(["plugins"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"wide-mlp\s.*my_blocks\.blocks\.WideMLPBlock\s.*my-blocks\s.*0\.1\.0", listed), listed
    assert re.search(r"capped-jacobi\s.*my_blocks\.samplers\.CappedJacobiSampler\s.*my-blocks", listed), listed

    flow_args = recipe_shown("plugins.md", "deep_block")["model"]["init_args"]["flow"]["init_args"]
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=4, frame_size=(2, 2), **flow_args)
    assert isinstance(flow.deep, WideMLPBlock)
    sampler = build_sampler(recipe_shown("plugins.md", "sampler")["model"]["init_args"]["sampler"])
    assert isinstance(sampler, CappedJacobiSampler) and sampler.max_iterations == 8


def test_plugins_md_conformance_tests_run_on_the_plugins(installed_plugin_package):
    # A few tests of each mixin: enough to show the test files of the docs collect and run on the plugins.
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "tests",
         "-k", "state_dict_round_trip or test_inverts_the_flow"],
        cwd=installed_plugin_package, env={**os.environ, "PYTHONPATH": str(installed_plugin_package)},
        capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert re.search(r"\b4 passed\b", tests.stdout), tests.stdout


def test_plugins_md_classes_are_used_from_python_without_a_package(checkpoint, tmp_path, monkeypatch):
    write_files_shown("plugins.md", tmp_path)  # importable, with no entry points
    export_checkpoint(checkpoint, tmp_path / "exported" / "model.safetensors", weights="trained")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry.SAMPLERS, "_entries", dict(registry.SAMPLERS._entries))
    try:
        shown = runpy.run_path("use_unpackaged.py")
    finally:
        forget_my_blocks()
    capped = shown["CappedJacobiSampler"]
    assert isinstance(shown["flow"].deep, shown["WideMLPBlock"]) and shown["flow"].deep.ratio == 6.0
    assert isinstance(shown["pipe"].sampler, capped) and shown["pipe"].sampler.max_iterations == 8
    assert isinstance(shown["sampler"], capped) and shown["sampler"].tol == 1e-3


def test_plugins_md_denoiser_is_taken_by_a_recipe_with_the_settings_it_says(tmp_path, monkeypatch, capsys):
    from flowvid.lit.cli_support import main as fit_main

    write_files_shown("plugins.md", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    overlay = recipe_shown("plugins.md", "denoiser")
    without_window = copy.deepcopy(overlay)
    del without_window["model"]["init_args"]["denoiser"]["init_args"]["window"]
    demo = DOCS.parent / "recipes" / "demo" / "shapes_t2v.yaml"
    windows = []
    try:
        for name, config in (("overlay.yaml", overlay), ("without_window.yaml", without_window)):
            (tmp_path / name).write_text(yaml.safe_dump(config))
            capsys.readouterr()
            with pytest.raises(SystemExit) as stop:
                fit_main(["fit", "--config", str(demo), "--config", str(tmp_path / name), "--print_config"])
            assert stop.value.code in (0, None)
            out = capsys.readouterr().out
            denoiser = yaml.safe_load(out[out.index("# lightning.pytorch"):])["model"]["init_args"]["denoiser"]
            assert denoiser["class_path"] == "my_blocks.denoisers.LongMemoryDenoiser"
            windows.append(denoiser["init_args"]["window"])
        from my_blocks.denoisers import LongMemoryDenoiser
    finally:
        forget_my_blocks()
    assert windows == [4, 2]  # the base recipe's window is kept where the overlay gives none, as the docs say
    assert LongMemoryDenoiser(4, (2, 2)).frames_seen == (4 * 2, 1)


def test_codecs_and_text_md_text_encoder_passes_its_conformance_tests(tmp_path):
    for path, body in files_shown("codecs_and_text.md").items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body, encoding="utf-8")
    (tmp_path / "my_text" / "__init__.py").touch()
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "tests"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert re.search(r"\b10 passed\b", tests.stdout), tests.stdout
