"""A fix for hivemind 1.1.12's 8-bit gradient compression under numpy 2.

hivemind's `Quantization.extract` reads the codebook size with `int()` on a one-element numpy
array, which numpy 2 refuses; every 8-bit part then fails to decode and hivemind's all-reduce
silently keeps each peer's local values for it (measured: 41.7 % of the values averaged). The
wire format is unchanged: this only reads it the way numpy 2 allows. Applied once, on import of
the training modules, so every path that decodes 8-bit tensors (swarm and DiLoCo) gets it.
"""

from __future__ import annotations

import numpy as np
import torch
from hivemind.compression import quantization


def _extract(self, serialized) -> torch.Tensor:
    codebook_size = int(np.frombuffer(serialized.buffer, count=1, dtype=np.int64)[0])
    codebook = np.frombuffer(serialized.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
    indices = np.frombuffer(serialized.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(tuple(serialized.size))
    values = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized.dtype))[indices]
    return values.requires_grad_(serialized.requires_grad)


def fix_8bit_decoding() -> None:
    quantization.Quantization.extract = _extract
