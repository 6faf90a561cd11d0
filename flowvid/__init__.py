"""flowvid: normalizing-flow video generators of the STARFlow-V family, trained with Lightning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowvid")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"


def __getattr__(name: str):
    # ``from flowvid import VideoPipeline`` without importing torch for ``import flowvid`` alone.
    if name == "VideoPipeline":
        from flowvid.pipeline import VideoPipeline

        return VideoPipeline
    raise AttributeError(f"module 'flowvid' has no attribute {name!r}")
