"""Plugins that are broken, misnamed or of the wrong kind, and names that are almost right."""

import functools

import pytest

import flowvid.registry as registry_module
from flowvid.cli import main
from flowvid.codecs import PixelCodec
from flowvid.flows import AffineBlock
from flowvid.flows.permutations import Flip
from flowvid.registry import BLOCKS, CODECS, REGISTRIES


class Distribution:
    def __init__(self, name, version):
        self.name, self.version = name, version


class FakeEntryPoint:
    """An installed entry point: loading it returns ``obj`` or raises ``error``."""

    def __init__(self, name, obj=None, error=None, dist=Distribution("acme-plugins", "1.2")):
        self.name, self.value, self.obj, self.error, self.dist = name, f"acme.mod:{name}", obj, error, dist

    def load(self):
        if self.error is not None:
            raise self.error
        return self.obj


@pytest.fixture
def install(monkeypatch):
    """Loads the given entry points, per group, as if installed; the registries are restored afterwards."""

    def installed(**by_group):
        registry_module.load_plugins()  # the built-ins register in the registries restored afterwards
        def entry_points(group=None):  # by group, as load_plugins asks; all of them, as `flowvid plugins` does
            return by_group.get(group, []) if group else registry_module.metadata.EntryPoints([])

        monkeypatch.setattr(registry_module.metadata, "entry_points", entry_points)
        monkeypatch.setattr(registry_module, "_loaded", False)
        for registry in REGISTRIES.values():
            monkeypatch.setattr(registry, "_entries", dict(registry._entries))
            monkeypatch.setattr(registry, "_failed", {})
        with pytest.warns(UserWarning) as warned:
            registry_module.load_plugins()
        return [str(warning.message) for warning in warned]

    return installed


class NotACodec:
    pass


class WiderBlock(AffineBlock):
    pass


def test_a_plugin_of_the_wrong_kind_is_refused_naming_the_class_and_the_base(install):
    warned = install(**{CODECS.group: [FakeEntryPoint("not-a-codec", NotACodec)]})
    message = f"{__name__}.NotACodec is not a subclass of flowvid.codecs.base.LatentCodec"
    assert len(warned) == 1 and message in warned[0] and "acme-plugins 1.2" in warned[0]
    with pytest.raises(KeyError, match=f"codec 'not-a-codec' is installed by acme-plugins 1.2 .*{message}"):
        CODECS.get("not-a-codec")
    assert CODECS.get("pixel") is PixelCodec


def test_registering_a_class_of_another_kind_by_decorator_is_refused(monkeypatch):
    monkeypatch.setattr(CODECS, "_entries", dict(CODECS._entries))
    with pytest.raises(TypeError, match="NotACodec is not a subclass of flowvid.codecs.base.LatentCodec"):
        CODECS.register("not-a-codec")(NotACodec)
    assert "not-a-codec" not in CODECS


def test_factories_of_the_kind_pass_the_check_and_factories_of_another_do_not():
    CODECS.check_kind(functools.partial(PixelCodec, patch_size=2))
    CODECS.check_kind(lambda: PixelCodec())  # what a function makes is checked where it is used
    with pytest.raises(TypeError, match="Flip, ...\\) is not a subclass of flowvid.codecs.base.LatentCodec"):
        CODECS.check_kind(functools.partial(Flip, 4))
    with pytest.raises(TypeError, match="is not a codec class or factory"):
        CODECS.check_kind("flowvid.codecs.PixelCodec")


@pytest.mark.parametrize("spelling", ["Affine", "afine", "AFFINE"])
def test_a_misspelt_name_suggests_the_registered_one_and_is_not_taken_for_it(spelling):
    suggestion = f"unknown block '{spelling}'; registered: .*affine.*; did you mean 'affine'\\?$"
    with pytest.raises(KeyError, match=suggestion):
        BLOCKS.get(spelling)


def test_a_name_like_no_other_suggests_nothing():
    with pytest.raises(KeyError) as raised:
        BLOCKS.get("zzzz")
    assert "did you mean" not in str(raised.value) and "affine" in str(raised.value)


@pytest.mark.parametrize("error", [ImportError("No module named 'acme_dep'"), SyntaxError("invalid syntax"),
                                   AttributeError("module 'acme.mod' has no attribute 'broken'"),
                                   RuntimeError("no GPU")])
def test_plugins_lists_a_plugin_that_failed_to_load_with_its_package_and_error(install, capsys, error):
    warned = install(**{BLOCKS.group: [FakeEntryPoint("broken", error=error), FakeEntryPoint("wider", WiderBlock)]})
    assert len(warned) == 1 and "'broken' of acme-plugins 1.2 (acme.mod:broken)" in warned[0]
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if "broken" in line]
    assert "acme.mod:broken" in row and "not loaded" in row and "acme-plugins" in row and "1.2" in row
    assert str(error)[:12] in out
    assert "wider" in out and "affine" in out  # the others are listed as ever


def test_of_two_packages_that_register_one_name_the_first_wins_and_the_other_is_named(install, capsys):
    class OtherBlock(AffineBlock):
        pass

    second = FakeEntryPoint("wider", OtherBlock, dist=Distribution("other-plugins", "3.0"))
    warned = install(**{BLOCKS.group: [FakeEntryPoint("wider", WiderBlock), second]})
    assert BLOCKS.get("wider") is WiderBlock
    assert len(warned) == 1 and "'wider' of other-plugins 3.0" in warned[0] and "is taken by" in warned[0]
    assert main(["plugins"]) == 0
    assert "other-plugins" in capsys.readouterr().out


def test_of_two_packages_that_register_one_name_the_first_by_package_name_wins_in_any_discovery_order(install):
    class OtherBlock(AffineBlock):
        pass

    second = FakeEntryPoint("wider", OtherBlock, dist=Distribution("other-plugins", "3.0"))
    warned = install(**{BLOCKS.group: [second, FakeEntryPoint("wider", WiderBlock)]})
    assert BLOCKS.get("wider") is WiderBlock  # acme-plugins before other-plugins, wherever each is installed
    assert len(warned) == 1 and "'wider' of other-plugins 3.0" in warned[0]


def test_a_plugin_failing_without_a_message_is_named_by_its_error_type(install):
    warned = install(**{CODECS.group: [FakeEntryPoint("silent", error=ImportError())]})
    assert len(warned) == 1 and warned[0].endswith("(acme.mod:silent): ImportError")
