"""flowvid: normalizing-flow video generators of the STARFlow-V family, trained with Lightning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowvid")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
