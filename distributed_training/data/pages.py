"""Deterministic, page-addressed training data.

Why pages: validators must be able to replay exactly what a miner trained on.
Data is cut into fixed pages of ``[page_size, seq_len]`` token ids addressed by
an integer id (the sources are in ``sources.py``); the same id gives the same
tokens in every process on every machine, and ``assign_pages`` (a pure function
of uid/round/seed) says which ids each miner owns in a round. The last ~2% of
pages are held out for eval and are never assigned. The small helpers every
source shares (the train/eval split, the digest, packing rows into a page) live
here too, so the sources agree on them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

__all__ = [
    "EVAL_FRACTION",
    "DataSourceError",
    "PageSource",
    "Split",
    "check_shape",
    "json_digest",
    "pack_tokens",
    "assign_pages",
    "batches",
    "training_pages",
    "load_pages",
    "pages_digest",
]

EVAL_FRACTION = 0.02


class DataSourceError(ValueError):
    """A page source cannot be built or read as configured (the message names the fix)."""


def check_shape(seq_len: int, page_size: int) -> None:
    if not (isinstance(seq_len, int) and seq_len >= 2):
        raise DataSourceError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if not (isinstance(page_size, int) and page_size >= 1):
        raise DataSourceError(f"page_size must be an int >= 1, got {page_size!r}")


@dataclass(frozen=True)
class Split:
    """Train/eval split of ``total`` pages: eval = the last ceil(2%) pages (at least one), never assigned."""

    total: int

    @property
    def num_eval(self) -> int:
        return max(1, math.ceil(self.total * EVAL_FRACTION))

    @property
    def num_train(self) -> int:
        return self.total - self.num_eval

    def check(self, page_id: int, what: str) -> None:
        if not isinstance(page_id, (int, np.integer)) or not 0 <= page_id < self.total:
            raise IndexError(f"page id {page_id!r} out of range for {what} (valid: 0..{self.total - 1})")


def json_digest(obj: Any) -> str:
    """sha256 of canonical JSON: what sources hash their identity with, so equal settings give equal digests."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pack_tokens(docs: Iterable[Sequence[int]], eos_id: int, page_size: int, seq_len: int) -> torch.Tensor:
    """One page from documents' token ids: each document then EOS, concatenated, cut to
    ``page_size*seq_len`` tokens, or cycled to that length when they are shorter."""
    need = page_size * seq_len
    ids: list[int] = []
    for doc in docs:
        ids.extend(doc)
        ids.append(eos_id)
        if len(ids) >= need:
            break
    flat = np.asarray(ids, dtype=np.int64)
    flat = flat[:need] if len(flat) >= need else np.resize(flat, need)  # resize cycles short pages
    return torch.from_numpy(flat.reshape(page_size, seq_len))


@runtime_checkable
class PageSource(Protocol):
    """Pages of token ids addressed by id; ids ``[0, num_pages)`` are assignable, eval ids follow."""

    @property
    def num_pages(self) -> int: ...
    @property
    def page_size(self) -> int: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def digest(self) -> str: ...
    def page(self, page_id: int) -> torch.Tensor: ...  # LongTensor [page_size, seq_len]
    def eval_page_ids(self) -> list[int]: ...


@lru_cache(maxsize=8)
def _permutation(seed: int, round_: int, num_pages: int) -> np.ndarray:
    """Seeded permutation of ``range(num_pages)``.

    Built from PCG64's raw output (a fixed, versioned bit stream) and a stable
    argsort rather than ``Generator.permutation``, whose algorithm numpy may
    change between releases; validators on other numpy versions must agree.
    """
    key = hashlib.sha256(f"distributed-training/pages:{seed}:{round_}".encode()).digest()
    bitgen = np.random.PCG64(int.from_bytes(key[:16], "little"))
    perm = np.argsort(bitgen.random_raw(num_pages), kind="stable")
    perm.flags.writeable = False
    return perm


# Above this many pages the permutation is computed per position (a keyed Feistel network)
# instead of materialised: a web corpus has hundreds of millions of pages, and sorting that many
# numbers every round would take tens of seconds and gigabytes. Below it, ids stay as they were.
FEISTEL_MIN_PAGES = 1 << 20
_FEISTEL_ROUNDS = 4


def _feistel_position(seed: int, round_: int, num_pages: int, position: int) -> int:
    """Entry ``position`` of a seeded permutation of ``range(num_pages)``, in O(1).

    A balanced Feistel network keyed by SHA-256 is a bijection on ``[0, 4**half)``; walking the
    cycle until the value falls below ``num_pages`` restricts it to a bijection on the pages
    (expected at most 4 steps, since ``4**half < 4 * num_pages``). Pure integer arithmetic and
    SHA-256, so every platform and library version agrees.
    """
    half = ((num_pages - 1).bit_length() + 1) // 2
    mask = (1 << half) - 1
    key = hashlib.sha256(f"distributed-training/pages-feistel:{seed}:{round_}".encode())
    x = position
    while True:
        left, right = x >> half, x & mask
        for r in range(_FEISTEL_ROUNDS):
            h = key.copy()
            h.update(bytes([r]) + right.to_bytes(8, "little"))
            left, right = right, left ^ (int.from_bytes(h.digest()[:8], "little") & mask)
        x = (left << half) | right
        if x < num_pages:
            return x


def assign_pages(uid: int, round: int, seed: int, *, pages_per_uid: int, num_pages: int) -> list[int]:  # noqa: A002
    """Page ids uid trains on in ``round``: a pure function anyone can replay.

    Uids take consecutive ``pages_per_uid`` slices of one seeded permutation, so
    they are disjoint while ``(uid+1)*pages_per_uid <= num_pages``; beyond that
    the slice wraps around (deterministically overlapping earlier uids). From
    ``FEISTEL_MIN_PAGES`` pages on, the permutation is a keyed Feistel network,
    whose cost does not grow with the number of pages.
    """
    checks = (("uid", uid, 0), ("round", round, 0), ("pages_per_uid", pages_per_uid, 1), ("num_pages", num_pages, 1))
    for name, value, lo in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"assign_pages: {name} must be an int >= {lo}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"assign_pages: seed must be an int, got {seed!r}")
    if pages_per_uid > num_pages:
        raise ValueError(
            f"assign_pages: pages_per_uid={pages_per_uid} exceeds num_pages={num_pages}; lower pages_per_uid"
        )
    start = int(uid) * int(pages_per_uid)
    if num_pages >= FEISTEL_MIN_PAGES:
        return [_feistel_position(int(seed), int(round), int(num_pages), (start + i) % num_pages)
                for i in range(pages_per_uid)]
    perm = _permutation(int(seed), int(round), int(num_pages))
    return [int(perm[(start + i) % num_pages]) for i in range(pages_per_uid)]


def training_pages(uid: int, seed: int, *, pages_per_round: int, num_pages: int,
                   asked: Callable[[], list[int]] = list) -> Iterator[int]:
    """The page ids a miner of `uid` trains on, forever: before each of its own assignments, the
    pages validators asked it about (`asked()` returns and clears them), which replace that round."""
    round_ = 0
    while True:
        page_ids = asked()
        if not page_ids:
            page_ids = assign_pages(uid, round_, seed, pages_per_uid=pages_per_round, num_pages=num_pages)
            round_ += 1
        yield from page_ids


def batches(source: PageSource, page_ids: Iterable[int], batch_size: int) -> Iterator[torch.Tensor]:
    """The pages' sequences in order, as batches of `batch_size` (a partial batch carries over to the next page)."""
    pending: list[torch.Tensor] = []
    for page_id in page_ids:
        pending.extend(source.page(page_id))
        while len(pending) >= batch_size:
            yield torch.stack(pending[:batch_size])
            pending = pending[batch_size:]


def load_pages(source: PageSource, page_ids: Sequence[int]) -> torch.Tensor:
    """Stack pages into one LongTensor ``[len(page_ids)*page_size, seq_len]`` (training batch order)."""
    if not page_ids:
        return torch.empty((0, source.seq_len), dtype=torch.long)
    return torch.cat([source.page(int(p)) for p in page_ids], dim=0)


def pages_digest(source: PageSource, page_ids: Sequence[int]) -> str:
    """sha256 over (page id, int32 little-endian tokens) of each page, in order: a cross-process fingerprint."""
    h = hashlib.sha256()
    for pid in page_ids:
        h.update(int(pid).to_bytes(8, "little", signed=True))
        h.update(source.page(int(pid)).numpy().astype("<i4").tobytes())
    return h.hexdigest()
