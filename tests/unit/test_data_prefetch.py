"""Pages fetched ahead: served without waiting, bounded in memory and on disk, transient errors
retried once reported, missing files clear at once; and wired into the miner and `build_data`."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distributed_training.config import parse_config
from distributed_training.data.assets import ensure_assets
from distributed_training.data.pages import DataSourceError, batches, training_pages
from distributed_training.data.parquet import ParquetPageSource
from distributed_training.data.prefetch import PagePrefetcher, is_transient, prefetch, read_ahead
from distributed_training.data.sources import LocalCorpusSource, make_page_source
from distributed_training.data.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    ensure_assets(None, log=lambda _: None)
    return load_tokenizer("local")


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for f in range(3):
        rows = [f"file {f} row {i}: " + "some words " * (i % 4) for i in range(512)]
        pq.write_table(pa.table({"text": rows}), tmp_path / "data" / f"{f}.parquet", row_group_size=128)
    return tmp_path / "data"


@pytest.fixture()
def source(data_dir: Path, tok: Tokenizer) -> ParquetPageSource:
    return make_page_source("hf", tokenizer=tok, seq_len=16, page_size=2, hf_data_files=str(data_dir))


def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition another thread makes true (checked, not assumed after a pause)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        threading.Event().wait(0.002)


class Gated:
    """A real source behind a gate: records which pages were started and holds them until opened."""

    def __init__(self, inner, fail: Callable[[int, int], BaseException | None] = lambda pid, n: None) -> None:
        self.inner, self.fail = inner, fail
        self.gate = threading.Event()
        self.started: list[int] = []
        self.finished = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def page(self, page_id: int) -> torch.Tensor:
        with self._lock:
            self.started.append(page_id)
            tries = self.started.count(page_id)
        self.gate.wait()
        error = self.fail(page_id, tries)
        try:
            if error is not None:
                raise error
            return self.inner.page(page_id)
        finally:
            with self._lock:
                self.finished += 1


def test_prefetched_pages_are_served_at_once_and_asked_pages_jump_the_queue(source: ParquetPageSource) -> None:
    gated = Gated(source)
    pf = PagePrefetcher(gated, workers=1)
    assert pf.digest == source.digest and pf.num_pages == source.num_pages
    pf.prefetch([3, 4, 5])
    _until(lambda: gated.started == [3])
    asked = threading.Thread(target=pf.page, args=(9,))
    asked.start()
    _until(lambda: pf.queued == 3)  # 4, 5 and the page asked for, 9
    gated.gate.set()
    asked.join(timeout=20)
    _until(lambda: gated.finished == 4)
    assert gated.started == [3, 9, 4, 5]
    for pid in (3, 4, 5, 9):
        assert torch.equal(pf.page(pid), source.page(pid))
    assert pf.stats.waits == 1 and pf.stats.requests == 5 and pf.stats.fetched == 4  # only the asked page waited
    pf.close()


def test_memory_stays_bounded_whatever_is_prefetched(source: ParquetPageSource) -> None:
    gated = Gated(source)
    pf = PagePrefetcher(gated, workers=2, memory_pages=4)
    pf.prefetch(range(10))
    assert pf.held == 4  # the other six are fetched when asked for
    gated.gate.set()
    _until(lambda: gated.finished == 4)
    pf.prefetch(range(10, 20))  # fetched pages make room, pending ones never do
    _until(lambda: gated.finished == 8)
    assert pf.held == 4 and sorted(gated.started) == [0, 1, 2, 3, 10, 11, 12, 13]
    assert torch.equal(pf.page(0), source.page(0)) and gated.started.count(0) == 2  # evicted: fetched again
    pf.close()


def test_transient_errors_are_retried_with_back_off_and_reported_once(
    source: ParquetPageSource, caplog: pytest.LogCaptureFixture
) -> None:
    gated = Gated(source, fail=lambda pid, n: ConnectionError(f"reset {pid}") if n <= 3 else None)
    gated.gate.set()
    delays: list[float] = []
    pf = PagePrefetcher(gated, workers=1, backoff_s=0.5, sleep=delays.append)
    with caplog.at_level(logging.WARNING, logger="distributed_training.data.prefetch"):
        assert torch.equal(pf.page(1), source.page(1)) and torch.equal(pf.page(2), source.page(2))
    assert delays == [0.5, 1.0, 2.0] * 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reading page 1 failed (ConnectionError: reset 1); retrying" in warnings[0].message
    pf.close()

    always = Gated(source, fail=lambda pid, n: TimeoutError("read timed out"))
    always.gate.set()
    pf = PagePrefetcher(always, workers=1, tries=3, sleep=lambda s: None)
    with pytest.raises(DataSourceError, match=r"reading page 7 failed 3 times \(TimeoutError: read timed out\); "
                                              r"check the network") as info:
        pf.page(7)
    assert "\n" not in str(info.value)
    with pytest.raises(DataSourceError):
        pf.page(7)  # a failure is not remembered: tried again
    assert always.started.count(7) == 6
    pf.close()


def test_a_missing_file_is_a_clear_error_at_once(source: ParquetPageSource, data_dir: Path) -> None:
    (data_dir / "2.parquet").unlink()  # indexed, never opened: its pages are the last ones
    delays: list[float] = []
    pf = PagePrefetcher(source, workers=1, sleep=delays.append)
    with pytest.raises(DataSourceError, match=r"data file 2.parquet is missing \(.*2.parquet\); restore it") as info:
        pf.page(source.num_pages - 1)
    assert delays == [] and "\n" not in str(info.value)
    assert torch.equal(pf.page(0), source.page(0))
    assert is_transient(ConnectionResetError()) and not is_transient(FileNotFoundError()) and not is_transient(
        ValueError())
    pf.close()


def test_disk_cache_serves_another_process_and_keeps_to_its_limit(source: ParquetPageSource, tmp_path: Path) -> None:
    cache = tmp_path / "pages"
    first = PagePrefetcher(source, workers=1, cache_dir=cache, cache_bytes=1 << 20)
    pages = {pid: first.page(pid) for pid in range(6)}
    first.close()

    class Unreachable:  # the same source, as another process that must not need the network
        def __getattr__(self, name):
            return getattr(source, name)

        def page(self, page_id):
            raise AssertionError(f"page {page_id} was read from the source")

    second = PagePrefetcher(Unreachable(), workers=1, cache_dir=cache, cache_bytes=1 << 20)
    assert all(torch.equal(second.page(pid), page) for pid, page in pages.items()) and second.stats.disk_hits == 6
    second.close()
    (corrupt,) = [p for p in cache.rglob("3.page")]
    corrupt.write_bytes(corrupt.read_bytes()[:-4] + b"\0\0\0\1")
    third = PagePrefetcher(source, workers=1, cache_dir=cache, cache_bytes=1 << 20)
    assert torch.equal(third.page(3), pages[3]) and third.stats.fetched == 1  # refetched, not trusted
    third.close()

    page_bytes = 32 + 4 * source.page_size * source.seq_len
    small = PagePrefetcher(source, workers=1, cache_dir=tmp_path / "small", cache_bytes=5 * page_bytes)
    for pid in range(20):
        small.page(pid)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "small").rglob("*.page"))
    assert 0 < on_disk <= 5 * page_bytes and small.disk.bytes == on_disk
    small.close()


def test_read_ahead_asks_for_the_next_pages_and_yields_the_same_ids(source: ParquetPageSource, tok: Tokenizer) -> None:
    gated = Gated(source)
    pf = PagePrefetcher(gated, workers=1)
    stream = read_ahead(pf, itertools.count(), 4)
    assert [next(stream) for _ in range(3)] == [0, 1, 2] and pf.held == 7  # 0..6 asked for
    gated.gate.set()
    pf.close()
    local = LocalCorpusSource(None, tok, 128, 4)
    assert list(read_ahead(local, iter([5, 1, 2]), 4)) == [5, 1, 2]
    prefetch(local, [1, 2])  # a source that cannot fetch ahead: nothing happens


def _config(*argv: str):
    return parse_config("miner", list(argv), env={}, dotenv_path=Path(__file__).with_name("absent.env"))


def test_miner_batches_come_fetched_ahead_and_equal_the_plain_stream(source: ParquetPageSource) -> None:
    from distributed_training.neuron.miner import Miner

    cfg = _config("--data.prefetch", "8", "--neuron.batch_size", "3", "--neuron.pages_per_round", "5")
    pf = PagePrefetcher(source, workers=2)
    miner = SimpleNamespace(parts=SimpleNamespace(source=pf), config=cfg, uid=2, _take_asked_pages=list)
    got = list(itertools.islice(Miner._batches(miner), 12))
    plain = batches(source, training_pages(2, cfg.data.seed, pages_per_round=5, num_pages=source.num_pages), 3)
    assert all(torch.equal(a, b) for a, b in zip(got, itertools.islice(plain, 12)))
    assert pf.stats.requests == 18 and pf.held >= 18 + 8 - 1  # 12 batches of 3 = 18 pages, 8 more asked for
    pf.close()


def test_build_data_prefetches_parquet_and_leaves_the_offline_corpus_alone(
    data_dir: Path, tok: Tokenizer, tmp_path: Path
) -> None:
    from distributed_training.neuron.setup import build_data

    tok.hf.save_pretrained(tmp_path / "tok")
    flags = ["--data.source", "hf", "--data.files", str(data_dir), "--data.tokenizer", str(tmp_path / "tok"),
             "--data.cache_dir", str(tmp_path / "cache"), "--model.seq_len", "16", "--data.page_size", "2"]
    _, _, hf_tok, built = build_data(_config(*flags))
    assert isinstance(built, PagePrefetcher) and isinstance(built.source, ParquetPageSource)
    assert built.disk is not None and built.disk.max_bytes == 512 << 20
    assert list((tmp_path / "cache" / "index").glob("parquet-index-*.json"))
    plain = make_page_source("hf", tokenizer=hf_tok, seq_len=16, page_size=2, hf_data_files=str(data_dir))
    assert built.digest == plain.digest and torch.equal(built.page(4), plain.page(4))
    built.close()
    _, _, _, direct = build_data(_config(*flags, "--data.prefetch", "0", "--data.rows_per_page", "4"))
    assert isinstance(direct, ParquetPageSource) and direct.rows_per_page == 4 and direct.digest != plain.digest
    _, _, _, local = build_data(_config("--model.seq_len", "128"))
    assert isinstance(local, LocalCorpusSource) and local.digest == LocalCorpusSource(None, tok, 128, 4).digest
