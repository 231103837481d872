"""The wire compressions a run can choose (`--neuron.grad_compression`), as hivemind codecs.

The names are the run spec's (`spec.COMPRESSIONS`); this table is the one place that maps them
to hivemind, and it must cover exactly those names.
"""

from __future__ import annotations

from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization

from ..spec import COMPRESSIONS
from . import hivemind_private  # noqa: F401  (the version check and the 8-bit decoding fix, before any codec is used)

CODECS: dict[str, type[CompressionBase]] = {"none": NoCompression, "fp16": Float16Compression,
                                            "uint8": Uniform8BitQuantization}
BYTES_PER_VALUE = {"none": 4, "fp16": 2, "uint8": 1}  # on the wire, per averaged value (uint8: about)
assert set(CODECS) == set(COMPRESSIONS) == set(BYTES_PER_VALUE), "the codec table must cover spec.COMPRESSIONS"


def codec(name: str) -> CompressionBase:
    """A fresh codec for `name`; ValueError names the valid ones."""
    if name not in CODECS:
        raise ValueError(f"unknown gradient compression {name!r}; use {', '.join(CODECS)}")
    return CODECS[name]()


def uncompressed() -> CompressionBase:
    """For state that must arrive exactly (θ_global served to joiners)."""
    return NoCompression()
