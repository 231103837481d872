"""Pages at fixed places in parquet files: any page in constant time, read as one row group's range.

The index is built once from the files' footers: files in name order, their row groups in order,
and in each row group the slots of ``rows_per_page`` consecutive rows; page ``p`` is the
``p``-th slot. Rows left at the end of a row group (fewer than ``rows_per_page``) belong to no
page, so no page spans row groups and where a page lies depends on the footers alone. Reading a
page opens its file at the recorded footer and reads that row group's text column only: a few
range requests on the Hub, whatever the page id. Each row's tokens are followed by EOS and the
page is their concatenation, cut to ``page_size*seq_len`` tokens (cycled if shorter; see
`pages.pack_tokens`); rows are tokenised only until the page is full.

What the index says (file names relative to their common directory, sizes, the sha256 of each
footer, rows per row group) is part of the digest, with the text field, tokenizer and shape, so a
changed file is a different digest, and a local copy of a dataset and the same files on the Hub
have the same digest and pages. The last ``EVAL_FRACTION`` of pages (in the last files) are held
out: ``num_pages`` counts only the pages before them.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distributed_training.data.listing import ParquetListing
from distributed_training.data.pages import (EVAL_FRACTION, DataSourceError, Split, check_shape, json_digest,
                                             pack_tokens)
from distributed_training.data.prefetch import with_retries
from distributed_training.data.tokenizer import Tokenizer
from distributed_training.files import atomic_write_bytes

__all__ = ["ParquetPageSource", "PageLocation", "LAYOUT"]

LAYOUT = "row-group-slots/1"  # how ids map to rows; part of the digest
_MAGIC = b"PAR1"
_TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view())


@dataclass(frozen=True)
class PageLocation:
    """Where a page's rows are: ``num_rows`` rows from ``first_row`` of row group ``row_group`` of ``file``."""

    file: str
    row_group: int
    first_row: int
    num_rows: int


@dataclass(frozen=True)
class _FileIndex:
    name: str
    size: int
    footer_sha256: str
    row_groups: tuple[int, ...]


def _read_footer(handle: Any, size: int, name: str) -> tuple[str, pq.FileMetaData]:
    """sha256 of the footer and the metadata it holds, read with two ranged reads from the end."""
    if size < 12:
        raise DataSourceError(f"{name} is not a parquet file ({size} bytes); remove it from the data files")
    handle.seek(size - 8)
    tail = handle.read(8)
    if len(tail) != 8 or tail[4:] != _MAGIC:
        raise DataSourceError(f"{name} is not a parquet file (no PAR1 footer); remove it from the data files")
    length = int.from_bytes(tail[:4], "little")
    if not 0 < length <= size - 12:
        raise DataSourceError(f"{name} has a broken parquet footer; re-download it")
    handle.seek(size - 8 - length)
    footer = handle.read(length)
    try:
        meta = pq.read_metadata(pa.BufferReader(_MAGIC + footer + tail))
    except (pa.ArrowException, OSError) as e:
        raise DataSourceError(f"{name} has a broken parquet footer ({e}); re-download it") from e
    return hashlib.sha256(footer).hexdigest(), meta


class ParquetPageSource:
    """Pages of parquet files, local or on the Hub (see the module's docstring)."""

    def __init__(self, listing: ParquetListing, tokenizer: Tokenizer, seq_len: int, page_size: int, *,
                 text_field: str = "text", rows_per_page: int | None = None,
                 index_cache_dir: Path | str | None = None, workers: int = 8, open_files: int = 16) -> None:
        check_shape(seq_len, page_size)
        self._rows_per_page = 4 * page_size if rows_per_page is None else rows_per_page
        if not (isinstance(self._rows_per_page, int) and self._rows_per_page >= 1):
            raise DataSourceError(f"rows_per_page must be an int >= 1, got {rows_per_page!r}")
        self._listing, self._tokenizer, self._text_field = listing, tokenizer, text_field
        self._seq_len, self._page_size = seq_len, page_size
        self._files = self._load_index(index_cache_dir, workers)
        self._build_slots()
        if self._split.total < 2:
            raise DataSourceError(f"{listing.where} has {self._split.total} page(s) of {self._rows_per_page} rows; "
                                  "it needs 2: add rows or lower --data.rows_per_page")
        self._digest = json_digest({
            "source": "parquet", "layout": LAYOUT, "text_field": text_field, "tokenizer": tokenizer.digest,
            "seq_len": seq_len, "page_size": page_size, "rows_per_page": self._rows_per_page,
            "eval_fraction": EVAL_FRACTION,
            "files": [[f.name, f.size, f.footer_sha256, list(f.row_groups)] for f in self._files],
        })
        self._open_files = open_files
        self._handles: OrderedDict[int, tuple[Any, threading.Lock]] = OrderedDict()
        self._handles_lock = threading.Lock()

    # -- the index -------------------------------------------------------------------------------
    def _load_index(self, cache_dir: Path | str | None, workers: int) -> list[_FileIndex]:
        listing = self._listing
        stamped = all(listing.stamps)
        key = json_digest({"layout": LAYOUT, "text_field": self._text_field,
                           "files": list(zip(listing.paths, listing.sizes, listing.stamps))})
        path = Path(cache_dir).expanduser() / f"parquet-index-{key[:32]}.json" if cache_dir and stamped else None
        if path is not None and path.is_file():
            try:
                cached = json.loads(path.read_text())
                return [_FileIndex(n, s, h, tuple(r)) for n, s, h, r in cached["files"]]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable: rebuilt below
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(listing.paths)))) as pool:
            files = list(pool.map(self._index_file, range(len(listing.paths))))
        if path is not None:
            blob = json.dumps({"files": [[f.name, f.size, f.footer_sha256, list(f.row_groups)] for f in files]})
            atomic_write_bytes(path, blob.encode())
        return files

    def _index_file(self, i: int) -> _FileIndex:
        name, size = self._listing.names[i], self._listing.sizes[i]
        footer_sha, meta = with_retries(lambda: self._read_meta(i), f"reading the footer of {name}")
        schema = meta.schema.to_arrow_schema()
        if self._text_field not in schema.names:
            raise DataSourceError(f"text field {self._text_field!r} not in {name} columns {schema.names}; "
                                  "set --data.text_field")
        if schema.field(self._text_field).type not in _TEXT_TYPES:
            raise DataSourceError(f"column {self._text_field!r} of {name} is {schema.field(self._text_field).type}, "
                                  "not text; set --data.text_field to a string column")
        rows = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        return _FileIndex(name, size, footer_sha, rows)

    def _open(self, i: int) -> Any:
        listing = self._listing
        try:
            if listing.fs is None:
                return open(listing.paths[i], "rb")
            return listing.fs.open(listing.paths[i], "rb", cache_type="none", size=listing.sizes[i])
        except FileNotFoundError as e:
            raise DataSourceError(f"data file {listing.names[i]} is missing ({listing.paths[i]}); restore it, or "
                                  "restart to index the files that are there") from e

    def _read_meta(self, i: int) -> tuple[str, pq.FileMetaData]:
        with self._open(i) as handle:
            return _read_footer(handle, self._listing.sizes[i], self._listing.names[i])

    def _build_slots(self) -> None:
        """Flat arrays over the row groups that hold at least one page: file, row group, first page id."""
        per_group = [(f, g, rows // self._rows_per_page) for f, entry in enumerate(self._files)
                     for g, rows in enumerate(entry.row_groups)]
        per_group = [item for item in per_group if item[2] > 0]
        self._group_file = np.asarray([f for f, _, _ in per_group], dtype=np.int64)
        self._group_index = np.asarray([g for _, g, _ in per_group], dtype=np.int64)
        counts = np.asarray([n for _, _, n in per_group], dtype=np.int64)
        self._group_start = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
        self._split = Split(int(counts.sum()))

    def _slot(self, page_id: int) -> tuple[int, int, int]:
        """(file index, row group, first row) of a page: a binary search over the row groups."""
        self._split.check(page_id, self._listing.where)
        g = int(np.searchsorted(self._group_start, int(page_id), side="right")) - 1
        slot = int(page_id) - int(self._group_start[g])
        return int(self._group_file[g]), int(self._group_index[g]), slot * self._rows_per_page

    def locate(self, page_id: int) -> PageLocation:
        """Where page ``page_id`` lies, found in time that does not grow with the id."""
        file_index, row_group, first_row = self._slot(page_id)
        return PageLocation(self._files[file_index].name, row_group, first_row, self._rows_per_page)

    # -- the PageSource interface ----------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self._split.num_train

    @property
    def total_pages(self) -> int:
        return self._split.total

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def rows_per_page(self) -> int:
        return self._rows_per_page

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def remote(self) -> bool:
        """Read through a filesystem (the Hub) rather than from local files."""
        return self._listing.fs is not None

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f.name for f in self._files)

    def eval_page_ids(self) -> list[int]:
        return list(range(self._split.num_train, self._split.total))

    def rows(self, page_id: int) -> list[str]:
        """The page's rows of text (a null row reads as an empty string)."""
        file_index, row_group, first_row = self._slot(page_id)
        try:
            table = self._read_group(file_index, row_group)
        except FileNotFoundError as e:
            raise DataSourceError(f"data file {self._files[file_index].name} is missing; restore it, "
                                  "or restart to index the files that are there") from e
        except (OSError, pa.ArrowException):
            # An open file may have changed under us: open it afresh, which checks its footer.
            self._drop_handle(file_index)
            table = self._read_group(file_index, row_group)
        column = table.column(0).slice(first_row, self._rows_per_page).to_pylist()
        return ["" if text is None else str(text) for text in column]

    def page(self, page_id: int) -> torch.Tensor:
        texts = self.rows(page_id)
        return pack_tokens(self._encoded(texts), self._tokenizer.eos_id, self._page_size, self._seq_len)

    def _encoded(self, texts: Sequence[str]) -> Iterator[list[int]]:
        """Token ids of each text, one at a time, so a page stops tokenising once it is full.

        One text at a time also keeps the tokenizer on the calling thread (no pool of its own), so a
        prefetch thread uses one core, at the priority it was given."""
        for text in texts:
            yield self._tokenizer.encode(text)

    # -- open files --------------------------------------------------------------------------------
    def _read_group(self, file_index: int, row_group: int) -> pa.Table:
        pf, lock = self._handle(file_index)
        with lock:
            return pf.read_row_group(row_group, columns=[self._text_field])

    def _drop_handle(self, file_index: int) -> None:
        with self._handles_lock:
            self._handles.pop(file_index, None)

    def _handle(self, file_index: int) -> tuple[pq.ParquetFile, threading.Lock]:
        """An open file, its footer checked against the index, from a small LRU (one reader at a time each).

        An evicted file is closed when its last reader lets go of it, never under a reader.
        """
        with self._handles_lock:
            if file_index in self._handles:
                self._handles.move_to_end(file_index)
                return self._handles[file_index]
        entry, listing = self._files[file_index], self._listing
        handle = self._open(file_index)
        try:
            try:  # it was a good parquet file when indexed: any other footer now means it changed
                footer_sha, meta = _read_footer(handle, entry.size, entry.name)
            except DataSourceError:
                footer_sha, meta = "", None
            if footer_sha != entry.footer_sha256:
                raise DataSourceError(f"data file {entry.name} changed since it was indexed (its footer differs); "
                                      "restart to index it again (the data digest changes with it)")
            if listing.fs is None:  # a local file: pyarrow's own reader, which reads without the GIL
                handle.close()
                pf = pq.ParquetFile(listing.paths[file_index], metadata=meta)
            else:
                pf = pq.ParquetFile(handle, metadata=meta)
        except BaseException:
            handle.close()
            raise
        with self._handles_lock:
            if file_index not in self._handles:
                self._handles[file_index] = (pf, threading.Lock())
                while len(self._handles) > self._open_files:
                    self._handles.popitem(last=False)
            return self._handles[file_index]
