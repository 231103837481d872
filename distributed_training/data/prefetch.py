"""Pages fetched and tokenised ahead, on background threads, so training never waits for data.

`PagePrefetcher` wraps a page source and is one itself: `prefetch(ids)` queues pages to fetch,
and `page(id)` returns a fetched page at once, or fetches it first, ahead of anything queued.
Fetched pages stay in a bounded in-memory LRU and, optionally, in a small on-disk cache with a
byte limit, which a restarted neuron (or another neuron on the machine) reads instead of the
network. Transient errors (an `OSError` other than a missing or forbidden file, an HTTP status
other than 4xx) are retried with exponential back-off and logged once; anything else, a missing
file first of all, surfaces at `page()` unchanged. The miner's page stream asks for the next
pages through `read_ahead`, the validator for the pages it may recompute through `prefetch`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from distributed_training.data.pages import DataSourceError, PageSource

__all__ = ["PagePrefetcher", "DiskPageCache", "PrefetchStats", "is_transient", "with_retries", "prefetch",
           "read_ahead"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(error: BaseException) -> bool:
    """Worth retrying: an I/O error that is not a missing or forbidden file, and no HTTP 4xx but 408/429.

    The Hub client's own connection errors (httpx's ``TransportError`` family) are not OSErrors,
    so they are recognised by that family's name.
    """
    if any(cls.__name__ == "TransportError" for cls in type(error).__mro__):
        return True
    if not isinstance(error, OSError) or isinstance(error, _PERMANENT):
        return False
    status = getattr(getattr(error, "response", None), "status_code", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


class _ReportOnce:
    """Logs the first transient error of a run and stays quiet about the rest (they are retried)."""

    def __init__(self) -> None:
        self.reported = False

    def __call__(self, what: str, error: BaseException) -> None:
        if not self.reported:
            self.reported = True
            logger.warning("%s failed (%s: %s); retrying with back-off (further transient data errors are "
                           "retried without a message)", what, type(error).__name__, error)


def with_retries(fn: Callable[[], T], what: str, *, tries: int = 5, backoff_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep,
                 report: Callable[[str, BaseException], None] | None = None) -> T:
    """``fn()``, retried after ``backoff_s * 2**k`` seconds on transient errors, ``tries`` times in all."""
    report = report or _ReportOnce()
    for attempt in range(tries):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified right here
            if not is_transient(e):
                raise
            if attempt == tries - 1:
                raise DataSourceError(f"{what} failed {tries} times ({type(e).__name__}: {e}); "
                                      "check the network or the data files") from e
            report(what, e)
            sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


class DiskPageCache:
    """Pages as files (sha256, then int32 tokens) under ``root/<digest>``, pruned to ``max_bytes`` in all.

    A file is written beside its final name and renamed over it, and read back only if its hash
    holds, so a torn or foreign file is refetched, never trusted. Pruning drops the least recently
    used files of every source under ``root`` until a quarter of the limit is free again.
    """

    SUFFIX = ".page"

    def __init__(self, root: Path | str, digest: str, max_bytes: int) -> None:
        self.root = Path(root).expanduser()
        self.dir = self.root / digest[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._bytes = sum(size for _, size, _ in self._files())

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        for sub in self.root.iterdir():
            if sub.is_dir():
                for path in sub.glob(f"*{self.SUFFIX}"):
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue  # pruned by another process meanwhile
                    out.append((st.st_mtime, st.st_size, path))
        return out

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, page_id: int, shape: tuple[int, int]) -> torch.Tensor | None:
        path = self.dir / f"{int(page_id)}{self.SUFFIX}"
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        body = blob[32:]
        if hashlib.sha256(body).digest() != blob[:32] or len(body) != 4 * shape[0] * shape[1]:
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # least recently used goes first
        except OSError:
            pass
        return torch.from_numpy(np.frombuffer(body, dtype="<i4").astype(np.int64).reshape(shape))

    def put(self, page_id: int, page: torch.Tensor) -> None:
        body = page.numpy().astype("<i4").tobytes()
        path = self.dir / f"{int(page_id)}{self.SUFFIX}"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(hashlib.sha256(body).digest() + body)
        os.replace(tmp, path)  # no fsync: the hash catches a file torn by a crash
        with self._lock:
            self._bytes += 32 + len(body)
            if self._bytes > self.max_bytes:
                self._prune()

    def _prune(self) -> None:
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.max_bytes * 3 // 4:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._bytes = total


@dataclass
class PrefetchStats:
    """How pages were served: ``waits`` counts `page()` calls that blocked, ``wait_s`` their time."""

    requests: int = 0
    waits: int = 0
    wait_s: float = 0.0
    fetched: int = 0
    disk_hits: int = 0


class PagePrefetcher:
    """A page source whose pages are fetched ahead by ``workers`` threads (see the module's docstring).

    At most ``memory_pages`` fetched pages are kept in memory (least recently used go first);
    `prefetch` beyond that many pending pages is ignored, so memory stays bounded whatever is asked.
    ``workers`` defaults to 8 threads for a remote source (they mostly wait on the network), else a
    quarter of the cores (2 to 8): a local page costs CPU (decoding a row group, tokenising).
    """

    def __init__(self, source: PageSource, *, workers: int | None = None, memory_pages: int = 256,
                 cache_dir: Path | str | None = None, cache_bytes: int = 0, tries: int = 5,
                 backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> None:
        workers = workers or (8 if getattr(source, "remote", False) else max(2, min(8, (os.cpu_count() or 1) // 4)))
        if workers < 1 or memory_pages < 1:
            raise DataSourceError(f"prefetch needs workers >= 1 and memory_pages >= 1, got {workers}, {memory_pages}")
        self.source = source
        self.disk = DiskPageCache(cache_dir, source.digest, cache_bytes) if cache_dir and cache_bytes > 0 else None
        self.stats = PrefetchStats()
        self._memory_pages = memory_pages
        self._retry = dict(tries=tries, backoff_s=backoff_s, sleep=sleep, report=_ReportOnce())
        self._lock = threading.Lock()
        self._pages: OrderedDict[int, Future] = OrderedDict()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"page-prefetch-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    # -- the PageSource interface ----------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.source.num_pages

    @property
    def page_size(self) -> int:
        return self.source.page_size

    @property
    def seq_len(self) -> int:
        return self.source.seq_len

    @property
    def digest(self) -> str:
        return self.source.digest

    def eval_page_ids(self) -> list[int]:
        return self.source.eval_page_ids()

    def page(self, page_id: int) -> torch.Tensor:
        """The page, at once if it was fetched, else fetched now (ahead of queued prefetches)."""
        page_id = int(page_id)
        with self._lock:
            future = self._pages.get(page_id)
            if future is None:
                self._make_room()
                future = self._pages[page_id] = Future()
            if not future.done():
                self._queue.put((0, next(self._order), page_id, future))  # jumps the prefetch queue
            self._pages.move_to_end(page_id)
        started = time.perf_counter()
        waited = not future.done()
        try:
            result = future.result()
        except BaseException:
            with self._lock:
                if self._pages.get(page_id) is future:
                    del self._pages[page_id]  # a failure is not remembered: the next call tries again
            raise
        finally:
            with self._lock:
                self.stats.requests += 1
                if waited:
                    self.stats.waits += 1
                    self.stats.wait_s += time.perf_counter() - started
        return result

    # -- fetching ahead ----------------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Pages in memory or on their way there (at most ``memory_pages`` plus pages asked for by `page`)."""
        with self._lock:
            return len(self._pages)

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def queued(self) -> int:
        """Requests waiting for a thread (a page asked for while queued counts twice)."""
        return self._queue.qsize()

    def prefetch(self, page_ids: Iterable[int]) -> None:
        """Queue these pages for the background threads, in order; known or over-capacity ones are skipped."""
        with self._lock:
            for page_id in map(int, page_ids):
                if page_id in self._pages:
                    continue
                if len(self._pages) >= self._memory_pages and not self._make_room():
                    break  # full of pages still pending: the rest are fetched when asked for
                future = self._pages[page_id] = Future()
                self._queue.put((1, next(self._order), page_id, future))

    def _make_room(self) -> bool:
        """Drop the least recently used fetched page if memory is full; False if all are still pending."""
        if len(self._pages) < self._memory_pages:
            return True
        for page_id, future in self._pages.items():
            if future.done():
                del self._pages[page_id]
                return True
        return False

    def _work(self) -> None:
        try:  # background work: when the training thread wakes, the kernel gives it a core first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass  # not Linux, or not allowed: same priority, still correct
        while True:
            _, _, page_id, future = self._queue.get()
            if future is None:
                return
            with self._lock:
                if future.done() or future.running() or self._pages.get(page_id) is not future:
                    continue  # served already, or queued twice (a page() asked for it meanwhile)
                future.set_running_or_notify_cancel()
            try:
                future.set_result(self._fetch(page_id))
            except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the page
                future.set_exception(e)

    def _fetch(self, page_id: int) -> torch.Tensor:
        shape = (self.source.page_size, self.source.seq_len)
        if self.disk is not None:
            cached = self.disk.get(page_id, shape)
            if cached is not None:
                with self._lock:
                    self.stats.disk_hits += 1
                return cached
        page = with_retries(lambda: self.source.page(page_id), f"reading page {page_id}", **self._retry)
        if self.disk is not None:
            self.disk.put(page_id, page)
        with self._lock:
            self.stats.fetched += 1
        return page

    def close(self) -> None:
        """Stop the threads once their current page is done (queued prefetches are dropped)."""
        for _ in self._threads:
            self._queue.put((-1, next(self._order), -1, None))
        for thread in self._threads:
            thread.join(timeout=10)


def prefetch(source: PageSource, page_ids: Iterable[int]) -> None:
    """Ask ``source`` to fetch these pages ahead, if it can (a `PagePrefetcher`); otherwise nothing."""
    ask = getattr(source, "prefetch", None)
    if ask is not None:
        ask(list(page_ids))


def read_ahead(source: PageSource, page_ids: Iterable[int], ahead: int) -> Iterator[int]:
    """``page_ids`` unchanged, having asked ``source`` to prefetch each ``ahead`` ids before it is yielded."""
    if ahead <= 0 or getattr(source, "prefetch", None) is None:
        yield from page_ids
        return
    window: deque[int] = deque()
    for page_id in page_ids:
        window.append(page_id)
        prefetch(source, [page_id])
        if len(window) > ahead:
            yield window.popleft()
    yield from window
