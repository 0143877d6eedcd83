"""CXR-BMD screener: opportunistic osteoporosis screening on frontal chest radiographs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxr-bmd-screener")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

#: Manufacturer (0008,0070) of every object the node writes. The receive path also uses it to
#: recognise our own result images coming back through a routing loop.
MANUFACTURER = "CXR-BMD Screener"
