"""A codec's or text encoder's identity does not hang on what else is installed: a plugin that loses its
short name to another package keeps the name its own package gives it, and identities recorded before
they carried the package still match. Also the inputs codecs and text encoders refuse, and how."""

from importlib import metadata

import numpy as np
import pytest
import torch

from flowvid import registry
from flowvid.codecs import PixelCodec
from flowvid.codecs.base import CodecMismatchError, LatentCodec, check_codec_identity, same_codec
from flowvid.text.base import TextEmbedding, TextEncoder, same_text_encoder


def codec_class(module: str) -> type:
    """A codec class defined, as far as identities tell, in ``module``."""
    class ClashCodec(PixelCodec):
        pass

    ClashCodec.__module__ = module
    return ClashCodec


def text_encoder_class(module: str) -> type:
    class ClashTextEncoder(TextEncoder):
        width, max_length = 4, 2

        def forward(self, captions):
            return TextEmbedding(torch.zeros(len(captions), 2, 4), torch.ones(len(captions), 2, dtype=torch.bool))

    ClashTextEncoder.__module__ = module
    return ClashTextEncoder


class FakeEntryPoint:
    """What ``importlib.metadata`` gives for an installed package's entry point."""

    def __init__(self, name: str, obj: object, package: str):
        self.name, self.obj = name, obj
        self.value = f"{obj.__module__}:{obj.__qualname__}"
        self.dist = type("Dist", (), {"name": package, "version": "1.0"})()

    def load(self):
        return self.obj


@pytest.fixture
def installed(monkeypatch):
    """Install entry points for the test's run only: ``installed(group, [FakeEntryPoint, ...])``; the
    registries are restored afterwards."""
    registry.load_plugins()  # the built-ins register on import: into the registries kept, not the test's copies
    monkeypatch.setattr(registry, "_loaded", False)
    for kind in registry.REGISTRIES.values():
        monkeypatch.setattr(kind, "_entries", dict(kind._entries))
        monkeypatch.setattr(kind, "_failed", dict(kind._failed))
        monkeypatch.setattr(kind, "_claimed", dict(kind._claimed))
    groups: dict[str, list] = {}
    real = metadata.entry_points
    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group=None, **kw: groups.get(group, []) if group in groups else real(group=group, **kw))

    def install(group: str, entry_points: list) -> None:
        groups[group] = entry_points

    return install


def test_a_codec_that_lost_its_short_name_keeps_its_name_and_identity(installed):
    mine, theirs = codec_class("my_codecs.codec"), codec_class("other_codecs.codec")
    installed("flowvid.codecs", [FakeEntryPoint("shared", mine, "zz-my-codecs"),
                                 FakeEntryPoint("shared", theirs, "aa-other-codecs")])  # sorts first: keeps the name
    with pytest.warns(UserWarning, match="could not load codec plugin 'shared' of zz-my-codecs"):
        assert registry.CODECS.get("shared") is theirs
    current = mine().identity()
    assert current["name"] == "shared" and current["package"] == "my_codecs"
    # What shards and checkpoints recorded before the other package came, and before identities carried
    # the package, still matches.
    recorded = {"name": "shared", "config_hash": PixelCodec().identity()["config_hash"]}
    assert same_codec(recorded, current) and same_codec({**recorded, "package": "my_codecs"}, current)
    # The two classes sharing the name are still told apart, and the error says why.
    assert not same_codec(theirs().identity(), current)
    with pytest.raises(CodecMismatchError, match="the name 'shared' is a codec of the package other_codecs there "
                                                 "and of my_codecs here"):
        check_codec_identity(current, theirs().identity(), "shards in lat/train")


def test_a_text_encoder_that_lost_its_short_name_keeps_its_name_and_identity(installed):
    mine, theirs = text_encoder_class("my_text.encoder"), text_encoder_class("bad_plug.mods")
    installed("flowvid.text_encoders", [FakeEntryPoint("hash", mine, "my-plug"),
                                        FakeEntryPoint("hash", theirs, "bad-plug")])
    with pytest.warns(UserWarning, match="could not load text encoder plugin 'hash' of my-plug"):
        assert registry.TEXT_ENCODERS.get("hash") is theirs
    current = mine().identity()
    assert current == {"name": "hash", "package": "my_text", "width": "4", "max_length": "2"}
    # As shards and checkpoints of earlier versions recorded it: the short name, no package.
    assert same_text_encoder({"name": "hash", "width": "4", "max_length": "2"}, current)
    assert not same_text_encoder(theirs().identity(), current)


def test_a_plugin_that_lost_its_name_is_still_not_known_by_it(installed):
    mine, theirs = codec_class("my_codecs.codec"), codec_class("other_codecs.codec")
    installed("flowvid.codecs", [FakeEntryPoint("shared", mine, "b"), FakeEntryPoint("shared", theirs, "a")])
    with pytest.warns(UserWarning):
        assert registry.CODECS.names().count("shared") == 1
    assert registry.CODECS.get("shared") is theirs and registry.CODECS.name_of(theirs) == "shared"


def test_builtin_identities_name_their_package():
    assert PixelCodec().identity()["package"] == "flowvid"
    assert PixelCodec().name == "pixel"


def test_a_class_defined_in_a_script_records_no_package_so_it_matches_once_a_module_defines_it():
    in_a_script, in_a_module = codec_class("__main__"), codec_class("my_codecs.codec")
    assert "package" not in in_a_script().identity()
    assert same_codec(in_a_script().identity(), in_a_module().identity())


def test_a_numpy_video_is_refused_naming_torch_from_numpy():
    video = np.zeros((1, 1, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(TypeError) as refused:
        PixelCodec().encode(video)
    message = str(refused.value)
    assert message == ("codec 'pixel' expects a torch.Tensor of uint8 video (B, T, H, W, 3), got numpy.ndarray; "
                       "convert it with torch.from_numpy(video)")
    assert PixelCodec().encode(torch.from_numpy(video)).shape == (1, 1, 16, 16, 3)


def test_a_float_tensor_is_still_a_value_error_naming_its_dtype():
    with pytest.raises(ValueError, match=r"expects uint8 video \(B, T, H, W, 3\), got torch.float32"):
        PixelCodec().encode(torch.zeros(1, 1, 4, 4, 3))


@pytest.mark.parametrize("captions, shown", [(None, "NoneType None; pass \\[caption\\]"), (5, "int 5")])
def test_captions_that_are_no_list_are_the_documented_value_error(captions, shown):
    encoder = text_encoder_class("my_text.encoder")()
    with pytest.raises(ValueError, match=f"expected a list of captions, got {shown}"):
        encoder.encode(captions)


def test_latent_codec_is_the_base_of_the_clash_codecs():
    assert issubclass(codec_class("x.y"), LatentCodec)
