"""hivemind's private surface: every override of a private method, private attribute and patch, in one place.

This project extends hivemind 1.1.12 where its public API has no hook:
- `fix_8bit_decoding`: 8-bit tensors decode wrongly under numpy 2 (a patch of `Quantization.extract`);
- `GroupRecordingOptimizer`: `hivemind.Optimizer` that records each all-reduce's group size, times
  its blocking calls and does not poll the DHT for partners while alone (overrides private methods);
- `ConsensusAllReduceRunner` and `RobustPartReducer`: the butterfly all-reduce changed so that every
  member of a group decodes the very same bits, each part is the robust mean of `robust.py` rather
  than a plain weighted sum, and an all-reduce in which any part failed is an error rather than a
  silent partial average (overrides the runner's and reducer's private methods);
- `BoundProgressTracker`: progress records count only when bound, and the followed epoch is robust
  to a lying record (overrides the tracker's record parsing; both training modes);
- `GuardedAveraging`: the gate hivemind lacks at its averaging RPCs (joining a group, sending parts,
  downloading state), asking a `swarm.guard.AveragingGuard`, and the consensus all-reduce, for every
  averager of both training modes (`PseudoGradientAverager`, `GuardedGradientAverager`,
  `GuardedStateAverager`);
- `CheckedStateDownload` (in `GuardedAveraging`): hivemind's state download, with each downloaded
  state checked (`swarm.state_digests`) and the next peer asked when it is refused.

Each depends on code that hivemind may change in any release, so importing this module checks the
installed version first and refuses any other with one line (`HivemindVersionError`).
"""

from __future__ import annotations

import logging

import hivemind
import numpy as np
import torch
from hivemind.compression import quantization

from .. import HivemindVersionError

logger = logging.getLogger(__name__)

SUPPORTED_HIVEMIND = "1.1.12"


def check_hivemind_version(installed: str = hivemind.__version__) -> None:
    """The overrides below are written against one hivemind release; any other is refused."""
    if installed != SUPPORTED_HIVEMIND:
        raise HivemindVersionError(
            f"hivemind {installed} is installed, but this release of distributed-training supports only "
            f"hivemind {SUPPORTED_HIVEMIND}; reinstall with `bash scripts/install.sh`")


check_hivemind_version()


# --- 8-bit decoding under numpy 2 ---------------------------------------------------------------------
# hivemind's `Quantization.extract` reads the codebook size with `int()` on a one-element numpy array,
# which numpy 2 refuses; every 8-bit part then fails to decode and the all-reduce silently keeps each
# peer's local values for it (measured: 41.7 % of the values averaged). The wire format is unchanged.
def _extract(self, serialized) -> torch.Tensor:
    codebook_size = int(np.frombuffer(serialized.buffer, count=1, dtype=np.int64)[0])
    codebook = np.frombuffer(serialized.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
    indices = np.frombuffer(serialized.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(tuple(serialized.size))
    values = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized.dtype))[indices]
    return values.requires_grad_(serialized.requires_grad)


def fix_8bit_decoding() -> None:
    quantization.Quantization.extract = _extract


fix_8bit_decoding()  # on import, so every path that decodes 8-bit tensors (both training modes) gets it



from .allreduce import ConsensusAllReduceRunner, RobustPartReducer  # noqa: E402  (after the version check)
from .gate import (GuardedAveraging, GuardedGradientAverager, GuardedStateAverager,  # noqa: E402
                   PseudoGradientAverager)
from .optimizer import GroupRecordingOptimizer  # noqa: E402
from .progress import BoundProgressTracker  # noqa: E402

__all__ = ["SUPPORTED_HIVEMIND", "check_hivemind_version", "fix_8bit_decoding", "ConsensusAllReduceRunner",
           "RobustPartReducer", "GuardedAveraging", "GuardedGradientAverager", "GuardedStateAverager",
           "PseudoGradientAverager", "GroupRecordingOptimizer", "BoundProgressTracker"]
