"""The codec plugin docs/plugins.md shows runs as written: registered by its entry point, and passing the
codec conformance kit with the test file the doc shows."""

import os
import re
import subprocess
import sys

from flowvid import registry
from flowvid.testing import CodecConformance
from test_docs_examples import installed_plugin_package  # noqa: F401 (a fixture)


def test_plugins_md_codec_registers_and_passes_its_conformance_tests(installed_plugin_package):  # noqa: F811
    from my_blocks.codecs import PatchMixCodec

    assert registry.CODECS.get("patch-mix") is PatchMixCodec
    assert PatchMixCodec().identity()["name"] == "patch-mix"
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rs",
         "tests/test_codecs.py"],
        cwd=installed_plugin_package, env={**os.environ, "PYTHONPATH": str(installed_plugin_package)},
        capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    # Every check of the kit runs and passes: none is skipped (the exact round trip included).
    checks = len([name for name in dir(CodecConformance) if name.startswith("test_")])
    assert re.search(rf"\b{checks} passed\b", tests.stdout) and "skipped" not in tests.stdout, tests.stdout
