"""Page sources: the offline corpus and Hugging Face datasets, cut into fixed pages of token ids.

Both give the same page id the same tokens in every process on every machine; which pages a uid
trains on is `pages.assign_pages`. The last ~2 % of pages are held out for eval and never assigned.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from distributed_training.data.assets import require_assets
from distributed_training.data.pages import EVAL_FRACTION, DataSourceError, PageSource
from distributed_training.data.tokenizer import Tokenizer, load_tokenizer
from distributed_training.files import atomic_write, atomic_write_bytes, sha256_file
from distributed_training.spec import DATA_SOURCES

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


def _check_shape(seq_len: int, page_size: int) -> None:
    if not (isinstance(seq_len, int) and seq_len >= 2):
        raise DataSourceError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if not (isinstance(page_size, int) and page_size >= 1):
        raise DataSourceError(f"page_size must be an int >= 1, got {page_size!r}")


@dataclass(frozen=True)
class _Split:
    """Train/eval split of ``total`` pages: eval = the last ceil(2%) pages (at least one)."""

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


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- local corpus -----------------------------------------------------------
# Chunks end right after a lone "\n" that sits between two non-space chars. GPT-2's
# pre-tokenizer always emits such a "\n" as its own pre-token, so encoding chunks
# separately gives exactly the whole-text ids while the Rust tokenizer uses every core.
# (For other tokenizers the split is still deterministic, which is what pages need.)
_SAFE_SPLIT = re.compile(r"(?<=\S\n)(?=\S)")


def _chunks(text: str, target: int = 1 << 16) -> list[str]:
    out: list[str] = []
    start = 0
    while start < len(text):
        m = _SAFE_SPLIT.search(text, start + target) if len(text) - start > target else None
        end = m.start() if m else len(text)
        out.append(text[start:end])
        start = end
    return out


def _tokenize_corpus(text: str, tokenizer: Tokenizer) -> np.ndarray:
    if tokenizer.vocab_size > 1 << 16:
        raise DataSourceError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids; the uint16 token cache needs <= 65536"
        )
    ids = [i for chunk in tokenizer.encode_batch(_chunks(text)) for i in chunk]
    return np.asarray(ids, dtype=np.uint16)


class LocalCorpusSource:
    """Pages from the offline Shakespeare corpus: contiguous, non-overlapping ``seq_len`` windows.

    The corpus is tokenized once and cached as ``cache/tokens-<tok digest[:16]>.npy``
    (uint16) next to a JSON sidecar holding its sha256; a cache that fails the
    check is rebuilt rather than trusted.
    """

    def __init__(self, assets_dir: Path | str | None, tokenizer: Tokenizer, seq_len: int, page_size: int) -> None:
        _check_shape(seq_len, page_size)
        paths = require_assets(assets_dir)
        self._tokenizer = tokenizer
        self._seq_len = seq_len
        self._page_size = page_size
        corpus_sha = sha256_file(paths.corpus_path)
        self._tokens = self._load_or_build(paths.root / "cache", paths.corpus_path, corpus_sha)
        n_seq = len(self._tokens) // seq_len
        self._split = _Split(n_seq // page_size)
        if self._split.total < 2:
            raise DataSourceError(
                f"corpus has {len(self._tokens)} tokens: too few for 2 pages of {page_size}x{seq_len}; "
                "lower seq_len/page_size"
            )
        self._digest = _json_digest(
            {"source": "local", "corpus": corpus_sha, "tokenizer": tokenizer.digest, "seq_len": seq_len,
             "page_size": page_size, "eval_fraction": EVAL_FRACTION}
        )

    def _load_or_build(self, cache_dir: Path, corpus: Path, corpus_sha: str) -> np.ndarray:
        stem = f"tokens-{self._tokenizer.digest[:16]}"
        npy, meta_path = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
        want = {"corpus_sha256": corpus_sha, "tokenizer_digest": self._tokenizer.digest}
        if npy.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                arr = np.load(npy, allow_pickle=False)
                if (all(meta.get(k) == v for k, v in want.items()) and arr.dtype == np.uint16
                        and hashlib.sha256(arr.tobytes()).hexdigest() == meta.get("sha256")):
                    return arr
            except (OSError, ValueError):
                pass  # unreadable/corrupt cache: rebuild below
        arr = _tokenize_corpus(corpus.read_text(encoding="utf-8"), self._tokenizer)
        atomic_write(npy, lambda handle: np.save(handle, arr, allow_pickle=False))
        meta = {**want, "sha256": hashlib.sha256(arr.tobytes()).hexdigest(), "num_tokens": int(len(arr))}
        # sidecar last: its presence means the .npy is complete
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
        return arr

    @property
    def num_pages(self) -> int:
        return self._split.num_train

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def num_tokens(self) -> int:
        return int(len(self._tokens))

    def eval_page_ids(self) -> list[int]:
        return list(range(self._split.num_train, self._split.total))

    def page(self, page_id: int) -> torch.Tensor:
        self._split.check(page_id, "the local corpus")
        n = self._page_size * self._seq_len
        flat = self._tokens[int(page_id) * n : (int(page_id) + 1) * n]
        return torch.from_numpy(flat.astype(np.int64).reshape(self._page_size, self._seq_len))


# --- Hugging Face datasets --------------------------------------------------
class HFDatasetSource:
    """Pages from a ``datasets`` dataset: page p = rows ``[p*R, (p+1)*R)``.

    Rows are tokenized, each followed by EOS, then truncated (or cycled, if
    short) to exactly ``page_size*seq_len`` tokens. With ``data_files`` the
    files are loaded locally (non-streaming, indexed); otherwise the Hub
    dataset is streamed. Nothing is loaded until a page or size is needed.
    """

    def __init__(
        self,
        dataset: str,
        config_name: str | None,
        split: str,
        text_field: str,
        tokenizer: Tokenizer,
        seq_len: int,
        page_size: int,
        data_files: str | Sequence[str] | None = None,
        rows_per_page: int | None = None,
        num_rows: int | None = None,
    ) -> None:
        _check_shape(seq_len, page_size)
        self._rows_per_page = page_size if rows_per_page is None else rows_per_page
        if not (isinstance(self._rows_per_page, int) and self._rows_per_page >= 1):
            raise DataSourceError(f"rows_per_page must be an int >= 1, got {rows_per_page!r}")
        self._files = self._check_files(data_files)
        self._builder = dataset
        if self._files:
            self._builder = dataset if dataset in set(_FILE_BUILDERS.values()) else self._infer_builder(self._files)
        self._dataset_name, self._config, self._split_name = dataset, config_name, split
        self._text_field = text_field
        self._tokenizer = tokenizer
        self._seq_len, self._page_size = seq_len, page_size
        self._num_rows = num_rows
        self._ds: Any = None
        self._split_info: _Split | None = None
        self._digest: str | None = None

    @staticmethod
    def _check_files(data_files: str | Sequence[str] | None) -> list[str]:
        if data_files is None:
            return []
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        missing = [str(f) for f in files if not Path(f).is_file()]
        if not files or missing:
            shown = ", ".join(missing) or "(empty list)"
            raise DataSourceError(f"hf data_files not found: {shown}; pass existing local files")
        return [str(f) for f in files]

    @staticmethod
    def _infer_builder(files: list[str]) -> str:
        exts = {Path(f).suffix.lower() for f in files}
        builders = {_FILE_BUILDERS.get(e) for e in exts}
        if None in builders or len(builders) != 1:
            raise DataSourceError(
                f"cannot infer a datasets loader for {sorted(exts)}; use one of {sorted(_FILE_BUILDERS)} files"
            )
        return builders.pop()  # type: ignore[return-value]

    def _field_error(self, columns: object) -> DataSourceError:
        return DataSourceError(f"text field {self._text_field!r} not in dataset columns {columns}; set the text field")

    @property
    def streaming(self) -> bool:
        return not self._files

    def _dataset(self) -> Any:
        if self._ds is None:
            import datasets  # lazy: heavy import, may touch the network for Hub names

            try:
                if self._files:
                    self._ds = datasets.load_dataset(
                        self._builder, data_files={self._split_name: self._files}, split=self._split_name
                    )
                else:
                    self._ds = datasets.load_dataset(
                        self._dataset_name, self._config, split=self._split_name, streaming=True
                    )
            except Exception as e:  # noqa: BLE001 - datasets raises many types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise DataSourceError(
                    f"could not load dataset {self._dataset_name!r} "
                    f"(config {self._config!r}, split {self._split_name!r}): "
                    f"{type(e).__name__}: {first}; check the name/network or use --data.source local"
                ) from e
            cols = getattr(self._ds, "column_names", None)
            if cols is not None and self._text_field not in cols:
                raise self._field_error(cols)
        return self._ds

    def _total_rows(self) -> int:
        if self._num_rows is not None:
            return self._num_rows
        ds = self._dataset()
        if not self.streaming:
            return len(ds)
        splits = getattr(ds.info, "splits", None) or {}
        info = splits.get(self._split_name) if hasattr(splits, "get") else None
        if info is None or not info.num_examples:
            raise DataSourceError(
                f"row count of streamed dataset {self._dataset_name!r} is unknown; pass num_rows (hf_num_rows)"
            )
        return int(info.num_examples)

    @property
    def _pages(self) -> _Split:
        if self._split_info is None:
            split = _Split(self._total_rows() // self._rows_per_page)
            if split.total < 2:
                raise DataSourceError(
                    f"dataset {self._dataset_name!r} has too few rows for 2 pages of {self._rows_per_page} rows"
                )
            self._split_info = split
        return self._split_info

    @property
    def num_pages(self) -> int:
        return self._pages.num_train

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def digest(self) -> str:
        if self._digest is None:
            # Local files are identified by content, not path, so machines agree.
            files = [sha256_file(Path(f)) for f in self._files]
            ident = {"dataset": self._dataset_name, "config": self._config} if not files else {"files": files}
            self._digest = _json_digest(
                {"source": "hf", **ident, "split": self._split_name, "text_field": self._text_field,
                 "tokenizer": self._tokenizer.digest, "seq_len": self._seq_len, "page_size": self._page_size,
                 "rows_per_page": self._rows_per_page, "eval_fraction": EVAL_FRACTION}
            )
        return self._digest

    def eval_page_ids(self) -> list[int]:
        return list(range(self._pages.num_train, self._pages.total))

    def _rows(self, start: int, count: int) -> list[str]:
        ds = self._dataset()
        if self.streaming:
            rows = []
            for r in ds.skip(start).take(count):
                if self._text_field not in r:
                    raise self._field_error(sorted(r))
                rows.append(r[self._text_field])
        else:
            rows = ds.select(range(start, start + count))[self._text_field]
        if len(rows) != count:
            raise IndexError(
                f"dataset returned {len(rows)} rows at offset {start}, expected {count}; is num_rows too large?"
            )
        return ["" if r is None else str(r) for r in rows]

    def page(self, page_id: int) -> torch.Tensor:
        self._pages.check(page_id, f"dataset {self._dataset_name!r}")
        texts = self._rows(int(page_id) * self._rows_per_page, self._rows_per_page)
        eos = self._tokenizer.eos_id
        ids = [i for doc in self._tokenizer.encode_batch(texts) for i in (*doc, eos)]
        need = self._page_size * self._seq_len
        flat = np.asarray(ids, dtype=np.int64)
        flat = flat[:need] if len(flat) >= need else np.resize(flat, need)  # resize cycles short pages
        return torch.from_numpy(flat.reshape(self._page_size, self._seq_len))


# --- factory / assignment ---------------------------------------------------
def make_page_source(
    source: str,
    *,
    assets_dir: Path | str | None = None,
    seq_len: int,
    page_size: int,
    hf_dataset: str = "HuggingFaceFW/fineweb-edu",
    hf_config: str | None = "sample-10BT",
    hf_split: str = "train",
    hf_text_field: str = "text",
    hf_data_files: str | Sequence[str] | None = None,
    tokenizer_name: str = "gpt2",
    hf_rows_per_page: int | None = None,
    hf_num_rows: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> PageSource:
    """Build the configured page source (``source`` in ``DATA_SOURCES``).

    ``tokenizer`` wins if given; otherwise "local" uses the offline GPT-2 and
    "hf" loads ``tokenizer_name`` (a Hub name or directory; "local" = offline).
    ``hf_data_files`` may be a comma-separated string, as the CLI flag gives it.
    """
    if source not in DATA_SOURCES:
        raise DataSourceError(f"unknown data source {source!r}; valid: {', '.join(DATA_SOURCES)}")
    root = Path(assets_dir).expanduser() if assets_dir is not None else None
    if tokenizer is None:
        use_local = source == "local" or tokenizer_name == "local"
        tokenizer = load_tokenizer("local", root) if use_local else load_tokenizer("hf", root, hf_name=tokenizer_name)
    if source == "local":
        return LocalCorpusSource(root, tokenizer, seq_len, page_size)
    if isinstance(hf_data_files, str):
        hf_data_files = [part.strip() for part in hf_data_files.split(",") if part.strip()]
    return HFDatasetSource(
        hf_dataset, hf_config, hf_split, hf_text_field, tokenizer, seq_len, page_size,
        data_files=hf_data_files or None, rows_per_page=hf_rows_per_page, num_rows=hf_num_rows,
    )
