"""CXR-BMD screener: opportunistic osteoporosis screening on frontal chest radiographs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxr-bmd-screener")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
