"""Page sources: the offline corpus and local files, cut into fixed pages of token ids, and the factory.

Every source gives the same page id the same tokens in every process on every machine; which pages
a uid trains on is `pages.assign_pages`. The last ~2 % of pages are held out for eval and never
assigned. Parquet data, local or a Hugging Face dataset on the Hub, is `parquet.ParquetPageSource`;
`make_page_source` picks the source the flags describe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from distributed_training.data.assets import require_assets
from distributed_training.data.listing import expand_local, hub_listing, local_listing
from distributed_training.data.pages import EVAL_FRACTION, DataSourceError, PageSource, Split, pack_tokens
from distributed_training.data.pages import check_shape as _check_shape
from distributed_training.data.pages import json_digest as _json_digest
from distributed_training.data.parquet import ParquetPageSource
from distributed_training.data.tokenizer import Tokenizer, load_tokenizer
from distributed_training.files import atomic_write, atomic_write_bytes, sha256_file
from distributed_training.spec import DATA_SOURCES

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


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
        self._split = Split(n_seq // page_size)
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
    """Pages from local json, jsonl, txt or csv files loaded by ``datasets``: page p = rows ``[p*R, (p+1)*R)``.

    The files are loaded indexed (not streamed), so any page costs the same. Rows are tokenized,
    each followed by EOS, then cut (or cycled, if short) to exactly ``page_size*seq_len`` tokens.
    Parquet files and Hub datasets are read by `ParquetPageSource` instead, a row group at a time.
    Nothing is loaded until a page or size is needed.
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
    ) -> None:
        _check_shape(seq_len, page_size)
        self._rows_per_page = page_size if rows_per_page is None else rows_per_page
        if not (isinstance(self._rows_per_page, int) and self._rows_per_page >= 1):
            raise DataSourceError(f"rows_per_page must be an int >= 1, got {rows_per_page!r}")
        self._files = self._check_files(data_files)
        self._builder = dataset if dataset in set(_FILE_BUILDERS.values()) else self._infer_builder(self._files)
        self._dataset_name, self._config, self._split_name = dataset, config_name, split
        self._text_field = text_field
        self._tokenizer = tokenizer
        self._seq_len, self._page_size = seq_len, page_size
        self._ds: Any = None
        self._split_info: Split | None = None
        self._digest: str | None = None

    @staticmethod
    def _check_files(data_files: str | Sequence[str] | None) -> list[str]:
        if data_files is None:
            raise DataSourceError("HFDatasetSource reads local files; give data_files (Hub datasets are read "
                                  "as parquet by ParquetPageSource)")
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

    def _dataset(self) -> Any:
        if self._ds is None:
            import datasets  # lazy: heavy import

            try:
                self._ds = datasets.load_dataset(
                    self._builder, data_files={self._split_name: self._files}, split=self._split_name
                )
            except Exception as e:  # noqa: BLE001 - datasets raises many types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise DataSourceError(
                    f"could not load data files {self._files} as {self._builder!r} (split {self._split_name!r}): "
                    f"{type(e).__name__}: {first}; check the files or use --data.source local"
                ) from e
            cols = getattr(self._ds, "column_names", None)
            if cols is not None and self._text_field not in cols:
                raise DataSourceError(
                    f"text field {self._text_field!r} not in dataset columns {cols}; set the text field")
        return self._ds

    @property
    def _pages(self) -> Split:
        if self._split_info is None:
            split = Split(len(self._dataset()) // self._rows_per_page)
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
            self._digest = _json_digest(
                {"source": "hf", "files": files, "split": self._split_name, "text_field": self._text_field,
                 "tokenizer": self._tokenizer.digest, "seq_len": self._seq_len, "page_size": self._page_size,
                 "rows_per_page": self._rows_per_page, "eval_fraction": EVAL_FRACTION}
            )
        return self._digest

    def eval_page_ids(self) -> list[int]:
        return list(range(self._pages.num_train, self._pages.total))

    def page(self, page_id: int) -> torch.Tensor:
        self._pages.check(page_id, f"dataset {self._dataset_name!r}")
        start = int(page_id) * self._rows_per_page
        rows = self._dataset().select(range(start, start + self._rows_per_page))[self._text_field]
        texts = ["" if r is None else str(r) for r in rows]
        return pack_tokens(self._tokenizer.encode_batch(texts), self._tokenizer.eos_id, self._page_size, self._seq_len)


# --- factory ------------------------------------------------------------------
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
    hf_revision: str | None = None,
    hub_fs: Any = None,
    index_cache_dir: Path | str | None = None,
    tokenizer: Tokenizer | None = None,
) -> PageSource:
    """Build the configured page source (``source`` in ``DATA_SOURCES``).

    ``tokenizer`` wins if given; otherwise "local" uses the offline GPT-2 and
    "hf" loads ``tokenizer_name`` (a Hub name or directory; "local" = offline).
    With "hf", parquet data (a Hub dataset's files through ``hub_fs``, by default
    ``HfFileSystem``, or local parquet files and directories in ``hf_data_files``)
    is read by `ParquetPageSource`; other local files (json, jsonl, txt, csv) by
    `HFDatasetSource`. ``hf_data_files`` may be a comma-separated string, as the
    CLI flag gives it; ``index_cache_dir`` keeps parquet indexes between starts.
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
    if hf_data_files:
        files = expand_local(hf_data_files)
        parquet = [f.suffix.lower() == ".parquet" for f in files]
        if not any(parquet):
            return HFDatasetSource(hf_dataset, hf_config, hf_split, hf_text_field, tokenizer, seq_len, page_size,
                                   data_files=[str(f) for f in files], rows_per_page=hf_rows_per_page)
        if not all(parquet):
            raise DataSourceError("data files mix parquet and other formats; give parquet files only, or none")
        listing = local_listing(files)
    else:
        listing = hub_listing(hf_dataset, hf_config, hf_split, revision=hf_revision, fs=hub_fs)
    return ParquetPageSource(listing, tokenizer, seq_len, page_size, text_field=hf_text_field,
                             rows_per_page=hf_rows_per_page, index_cache_dir=index_cache_dir)
