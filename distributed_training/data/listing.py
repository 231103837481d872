"""Where parquet files come from: local files and directories, or a Hugging Face dataset's files.

Both give one `ParquetListing`, so the same parquet code reads a local directory and the Hub. On
the Hub the files are read through `huggingface_hub.HfFileSystem` (range requests); which files
make a dataset's config and split comes from the `configs` of its card (README.md), the way
`datasets` reads them, or else from the Hub's parquet conversion branch (`refs/convert/parquet`).
Files are named relative to their common directory, so a local copy of a dataset's files and the
same files on the Hub get the same names, hence the same digest.
"""

from __future__ import annotations

import glob
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

from distributed_training.data.pages import DataSourceError

__all__ = ["ParquetListing", "expand_local", "local_listing", "hub_listing", "CONVERTED_REVISION"]

CONVERTED_REVISION = "refs/convert/parquet"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ParquetListing:
    """The files of a dataset in page order: how to open them, their sizes, and what names them.

    ``fs`` is an fsspec filesystem (``None``: plain local paths). ``stamps`` change when a file
    does (mtime, the Hub's LFS sha256 or blob id): the index cache is keyed by them.
    """

    fs: Any
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    names: tuple[str, ...]
    stamps: tuple[str, ...]
    where: str

    def __post_init__(self) -> None:
        if not self.paths:
            raise DataSourceError(f"{self.where} has no parquet files; point the source at .parquet files")


def _relative_names(paths: Sequence[str]) -> list[str]:
    """Each path relative to the deepest directory holding them all (all absolute, or all relative)."""
    common = posixpath.commonpath([posixpath.dirname(p) for p in paths])
    return [posixpath.relpath(p, common) for p in paths] if common not in ("", "/") else [p.lstrip("/") for p in paths]


def _ordered(paths: Sequence[str], sizes: Sequence[int], stamps: Sequence[str], fs: Any, where: str) -> ParquetListing:
    names = _relative_names(list(paths))
    if len(set(names)) != len(names):
        raise DataSourceError(f"{where} lists a file twice; give each parquet file once")
    order = sorted(range(len(paths)), key=lambda i: names[i])
    return ParquetListing(fs=fs, paths=tuple(paths[i] for i in order), sizes=tuple(int(sizes[i]) for i in order),
                          names=tuple(names[i] for i in order), stamps=tuple(stamps[i] for i in order), where=where)


# --- local files --------------------------------------------------------------------------------
def expand_local(entries: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by ``entries``: a file itself, every ``*.parquet`` under a directory, or a glob's matches."""
    out: list[Path] = []
    for entry in entries:
        text = os.path.expanduser(str(entry))
        if _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataSourceError(f"data files pattern {text} matches nothing; check the path")
            out.extend(Path(m) for m in matches if Path(m).is_file())
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).rglob("*.parquet") if p.is_file())
            if not found:
                raise DataSourceError(f"directory {text} has no .parquet files; give parquet files or a directory of them")
            out.extend(found)
        elif Path(text).is_file():
            out.append(Path(text))
        else:
            raise DataSourceError(f"data file {text} not found; pass existing local files or a directory")
    if not out:
        raise DataSourceError("no data files given; pass local files or a directory of parquet files")
    return out


def local_listing(paths: Sequence[Path], where: str = "--data.files") -> ParquetListing:
    """Local parquet files, opened as plain files (pyarrow reads just the row groups asked for)."""
    resolved = [str(Path(p).resolve()) for p in paths]
    stats = [os.stat(p) for p in resolved]
    return _ordered(resolved, [s.st_size for s in stats], [f"mtime_ns={s.st_mtime_ns}" for s in stats], None, where)


# --- the Hub ------------------------------------------------------------------------------------
def _card_configs(fs: Any, root: str) -> list[dict] | None:
    """The ``configs`` of the dataset card's YAML header, or None when the card has none."""
    import yaml

    try:
        with fs.open(f"{root}/README.md", "rb") as handle:
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    if not text.startswith("---"):
        return None
    header = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(header) or {}
    except yaml.YAMLError:
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else None


def _split_patterns(data_files: Any, split: str) -> list[str]:
    """Patterns of one split from a card's ``data_files`` (a string, a list, or split entries)."""
    if isinstance(data_files, str):
        return [data_files] if split == "train" else []
    if isinstance(data_files, dict):
        value = data_files.get(split)
        return [value] if isinstance(value, str) else list(value or [])
    patterns: list[str] = []
    for item in data_files or []:
        if isinstance(item, str) and split == "train":
            patterns.append(item)
        elif isinstance(item, dict) and item.get("split", "train") == split:
            path = item.get("path")
            patterns.extend([path] if isinstance(path, str) else list(path or []))
    return patterns


def _glob_files(fs: Any, root: str, patterns: Sequence[str]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for pattern in patterns:
        matches = fs.glob(f"{root}/{pattern.lstrip('/')}", detail=True)
        for name, info in matches.items():
            if info.get("type", "file") == "file" and name.endswith(".parquet"):
                found[name] = info
    return found


def _stamp(info: dict) -> str:
    lfs = info.get("lfs") or {}
    for key, value in (("lfs_sha256", lfs.get("sha256")), ("blob_id", info.get("blob_id")),
                       ("mtime", info.get("mtime"))):
        if value:
            return f"{key}={value}"
    return ""


def _hub_root(dataset: str, revision: str | None) -> str:
    return f"datasets/{dataset}" + (f"@{quote(revision, safe='')}" if revision else "")


def hub_listing(dataset: str, config: str | None, split: str, revision: str | None = None, fs: Any = None) -> ParquetListing:
    """The parquet files of ``dataset``'s ``config`` and ``split`` on the Hub, via ``HfFileSystem``,
    at the commit ``revision`` (default: main) points to now.

    ``fs`` defaults to ``huggingface_hub.HfFileSystem()``; any fsspec filesystem laid out like the
    Hub (``datasets/<org>/<name>[@<revision>]/...``) works, which is how this is tested offline.
    """
    where = f"dataset {dataset!r} (config {config!r}, split {split!r})"
    try:
        if fs is None:
            from huggingface_hub import HfApi, HfFileSystem

            fs = HfFileSystem()
            # Pinned to the commit: a file that changes on the Hub later cannot change under this run.
            revision = HfApi().dataset_info(dataset, revision=revision).sha or revision
        root = _hub_root(dataset, revision)
        configs = _card_configs(fs, root)
        files: dict[str, dict] = {}
        if configs:
            wanted = config or "default"
            chosen = [c for c in configs if c.get("config_name", "default") == wanted]
            if not chosen:
                names = ", ".join(str(c.get("config_name", "default")) for c in configs)
                raise DataSourceError(f"{where}: no such config; its configs are {names}; set --data.dataset_config")
            files = _glob_files(fs, root, _split_patterns(chosen[0].get("data_files"), split))
        if not files:  # no card configs, or they name no parquet files: the Hub's own parquet copy
            converted = _hub_root(dataset, CONVERTED_REVISION)
            folder = config or "default"
            files = _glob_files(fs, converted, [f"{folder}/{split}/*.parquet", f"{folder}/partial-{split}/*.parquet"])
    except DataSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - the Hub client raises many types (HTTP, OS, value errors)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataSourceError(f"could not list {where} on the Hub ({type(e).__name__}: {first}); check the network "
                              "and --data.dataset, or give --data.files or --data.source local") from e
    if not files:
        raise DataSourceError(f"{where} has no parquet files on the Hub; check --data.dataset_config and --data.split")
    paths = sorted(files)
    return _ordered(paths, [files[p].get("size") or 0 for p in paths], [_stamp(files[p]) for p in paths], fs, where)
