"""Pixel decoders for every compressed transfer syntax real archives hold.

pydicom decodes through plugins; radflow pins the packages behind them (pyproject.toml):

* RLE (1.2.840.10008.1.2.5): pylibjpeg + pylibjpeg-rle (pydicom's own as fallback);
* JPEG-LS (.4.80 lossless, .4.81 near-lossless): pyjpegls (CharLS), python-gdcm;
* JPEG 2000 (.4.90, .4.91): pylibjpeg + pylibjpeg-openjpeg, python-gdcm;
* JPEG baseline (.4.50), lossless (.4.57, .4.70): python-gdcm, and imagecodecs;
* JPEG extended 12-bit (.4.51): imagecodecs only (libjpeg-turbo 3 reads 12-bit and lossless
  JPEG; pydicom's gdcm and pillow plugins refuse 12-bit, and pylibjpeg-libjpeg is GPL-3.0);
* deflate (.1.99) is a data set encoding pydicom inflates itself.

``register`` adds imagecodecs as one more pydicom decoder plugin for the JPEG processes; pydicom
tries each available plugin in turn, so a frame one cannot read is tried with the next.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pydicom import uid
from pydicom.pixels import get_decoder

JPEG_SYNTAXES = (
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
)
# pydicom's plugin interface: what the plugin needs, per transfer syntax
DECODER_DEPENDENCIES = {ts: ("imagecodecs",) for ts in JPEG_SYNTAXES}
LABEL = "imagecodecs"


def is_available(ts: str) -> bool:
    """pydicom plugin interface: can this plugin decode ``ts`` here."""
    return ts in JPEG_SYNTAXES and importlib.util.find_spec("imagecodecs") is not None


def decode_frame(src: bytes, runner: Any) -> bytearray:
    """pydicom plugin interface: one JPEG frame (any process libjpeg-turbo reads) as bytes in
    the container pydicom expects (8-bit samples in bytes, 9-16 bit in 16-bit words)."""
    import imagecodecs

    arr = imagecodecs.jpeg8_decode(src)
    if arr.ndim == 3:  # colour comes back as RGB, pixel-interleaved
        runner.set_option("photometric_interpretation", "RGB")
        runner.set_option("planar_configuration", 0)
    runner.set_option("bits_allocated", 8 * arr.dtype.itemsize)
    return bytearray(arr.tobytes())


def register() -> None:
    """Add the imagecodecs plugin to pydicom's JPEG decoders (once per process)."""
    for ts in JPEG_SYNTAXES:
        try:
            get_decoder(ts).add_plugin(LABEL, ("radflow.codecs", "decode_frame"))
        except ValueError:  # already added (a label is unique per decoder)
            pass
