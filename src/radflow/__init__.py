"""radflow: raw CT DICOM in, an explained 3D classifier out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("radflow")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"
