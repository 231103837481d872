"""(e) Data wait: the share of a miner's wall time spent waiting for pages, at a GPU-like step rate.

The training step is made artificially fast: it sleeps for `batch tokens / --tokens-per-s` seconds,
like a GPU step during which the Python thread only waits for the device (the CPU stays free for
the prefetch threads, as with a real GPU). The default 100,000 tokens/s is this project's miner
(transformers' GPT-2 under bf16 autocast) training `gpt2-124m` on an A100 at about 28 % MFU
(~0.86 GFLOPs per token by the estimate in bench/gpu_step.py, 312 TFLOPS dense bf16 peak). A
faster GPU needs proportionally more of the prefetch threads' rate, which the last line of the
output gives for this machine. The pages come from the miner's own stream (`Miner._batches`: `training_pages`,
`read_ahead`, `batches`) over a parquet dataset written here: `--files` files of `--groups` row
groups of 1,000 rows of Shakespeare cut into documents of web-page length (300 to 6,000 chars),
read with `seq_len` 1024, 4 sequences a page and 16 rows a page (the defaults for `gpt2-124m`).

Three ways to read the same pages, and the offline corpus (in memory) as the floor:

- `on the training thread`: the parquet source itself, no prefetch: what a miner did before;
- `prefetched, local files`: `build_data`'s `PagePrefetcher` over the local directory;
- `prefetched, remote`: the same files through an fsspec filesystem that waits `--latency-ms` per
  read request, as range requests to the Hub do (the source counts as remote: 8 threads).

The wait share is the time the training loop spent in `next(batches)` over its wall time, after
the first batch (the first page of a start is always waited for; its wait is reported apart).
The prefetch threads' own rate (pages fetched ahead with nobody training) says which step rate
this machine's cores can feed at all.

    python bench/data_wait.py [--steps 150] [--tokens-per-s 100000] [--latency-ms 20] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

from report import record, table  # noqa: E402


def write_dataset(root: Path, corpus: str, files: int, groups: int, rows: int = 1000) -> int:
    """Parquet files of documents cut from the corpus; returns the bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        docs = []
        for _ in range(groups * rows):
            start, length = rng.randrange(len(corpus) - 6000), rng.randrange(300, 6000)
            docs.append(corpus[start:start + length])
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), root / f"{f:03d}.parquet",
                       row_group_size=rows)
    return sum(p.stat().st_size for p in root.glob("*.parquet"))


def slow_filesystem(root: Path, latency_s: float):
    """The local files through fsspec, every read request waiting `latency_s` first (a Hub-like link)."""
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem

    class SlowFile:
        def __init__(self, handle):
            self._handle = handle

        def read(self, *args):
            time.sleep(latency_s)
            return self._handle.read(*args)

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    class SlowFS(DirFileSystem):
        def _open(self, path, *args, **kwargs):
            return SlowFile(super()._open(path, *args, **kwargs))

    return SlowFS(path=str(root), fs=fsspec.filesystem("file"))


def run(source, cfg, steps: int, step_s: float) -> dict:
    """The miner's batch stream against a simulated GPU step; seconds waited, after the first batch."""
    from distributed_training.neuron.miner import Miner

    miner = SimpleNamespace(parts=SimpleNamespace(source=source), config=cfg, uid=1, _take_asked_pages=list)
    stream = Miner._batches(miner)
    started = time.perf_counter()
    next(stream)
    first = time.perf_counter() - started
    stats = getattr(source, "stats", None)
    blocked_before = stats.wait_s if stats else 0.0
    time.sleep(step_s)
    in_next, loop_started = 0.0, time.perf_counter()
    for _ in range(steps - 1):
        t = time.perf_counter()
        next(stream)
        in_next += time.perf_counter() - t
        time.sleep(step_s)  # the GPU step
    wall = time.perf_counter() - loop_started
    # Without a prefetcher every page is read inside next(): all of it is waiting for data.
    blocked = stats.wait_s - blocked_before if stats else in_next
    return {"first": first, "blocked": blocked, "in_next": in_next, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tokens-per-s", type=float, default=100_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from distributed_training.config import parse_config
    from distributed_training.data.assets import require_assets
    from distributed_training.data.listing import hub_listing, local_listing, expand_local
    from distributed_training.data.parquet import ParquetPageSource
    from distributed_training.data.prefetch import PagePrefetcher
    from distributed_training.data.sources import LocalCorpusSource
    from distributed_training.data.tokenizer import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="dt-data-wait-"))
    corpus = require_assets(None).corpus_path.read_text(encoding="utf-8")
    data = work / "hub" / "datasets" / "bench" / "web" / "data"
    size = write_dataset(data, corpus, args.files, args.groups)
    (data.parent / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: data/*\n---\n")
    tokenizer = load_tokenizer("local")
    tokenizer.hf.save_pretrained(work / "tok")
    cfg = parse_config("miner", ["--data.source", "hf", "--data.files", str(data), "--data.tokenizer", str(work / "tok"),
                                 "--data.cache_dir", str(work / "cache"), "--model.preset", "gpt2-124m",
                                 "--neuron.batch_size", str(args.batch_size), "--model.seq_len", str(args.seq_len)],
                       env={}, dotenv_path=work / "absent.env")  # no .env: the defaults
    shape = dict(seq_len=args.seq_len, page_size=cfg.data.page_size)
    step_s = args.batch_size * args.seq_len / args.tokens_per_s

    from distributed_training.neuron.setup import build_data

    remote_fs = slow_filesystem(work / "hub", args.latency_ms / 1000)
    prefetch_kw = dict(memory_pages=max(256, 4 * cfg.data.prefetch), cache_bytes=cfg.data.cache_mb << 20)
    sources = {
        "offline corpus in memory (no data to fetch: the floor)": lambda: LocalCorpusSource(None, tokenizer, **shape),
        "parquet on the training thread (no prefetch)": lambda: ParquetPageSource(
            local_listing(expand_local([data])), tokenizer, **shape),
        "parquet prefetched, local files (`build_data`)": lambda: build_data(cfg)[3],
        f"parquet prefetched, remote ({args.latency_ms:g} ms a read)": lambda: PagePrefetcher(ParquetPageSource(
            hub_listing("bench/web", None, "train", fs=remote_fs), tokenizer, **shape),
            cache_dir=work / "cache-remote", **prefetch_kw),
    }
    rows, results = [], {}
    for name, build in sources.items():
        source = build()
        result = results[name] = run(source, cfg, args.steps, step_s)
        rows.append([name, f"{100 * result['blocked'] / result['wall']:.2f} %",
                     f"{100 * result['in_next'] / result['wall']:.2f} %", f"{1000 * result['first']:.0f}",
                     f"{result['wall']:.1f}"])
        getattr(source, "close", lambda: None)()
    producer = PagePrefetcher(ParquetPageSource(local_listing(expand_local([data])), tokenizer, **shape))
    producer.page(0)  # files open, as in a running miner
    started = time.perf_counter()  # the prefetch threads alone, no disk cache: how fast they fill memory
    producer.prefetch(range(1, 201))
    for pid in range(1, 201):
        producer.page(pid)
    capacity, workers = 200 / (time.perf_counter() - started), producer.workers
    producer.close()
    shutil.rmtree(work, ignore_errors=True)
    share = {name: 100 * r["blocked"] / r["wall"] for name, r in results.items()}
    names = list(sources)
    pages = args.steps * args.batch_size // cfg.data.page_size
    body = table(["pages from", "waiting for pages / wall", "all of next(batches) / wall", "first batch, ms",
                  "wall s"], rows)
    body += (f"\n\nA miner at **{args.tokens_per_s:,.0f} tokens/s** (a step of {args.batch_size} x {args.seq_len} "
             f"tokens every {1000 * step_s:.1f} ms, simulated) waits for data **{share[names[2]]:.2f} %** of its wall "
             f"time with pages prefetched from local files (target < 1 %), {share[names[3]]:.2f} % from a remote "
             f"filesystem with {args.latency_ms:g} ms a read, and {share[names[1]]:.1f} % reading pages on the "
             "training thread. Waiting for pages is the time `page()` blocked for a page not fetched yet; "
             "all of `next(batches)` adds assembling batches and, on this machine's 2 shared cores, being "
             "scheduled after the prefetch threads (the offline corpus row is that floor with no fetching at all). "
             f"{args.steps} steps, {pages} pages of {cfg.data.page_size} x {args.seq_len} tokens from "
             f"{cfg.data.rows_per_page or 4 * cfg.data.page_size} rows each; {args.files} parquet files, "
             f"{args.files * args.groups} row groups of 1,000 rows, {size / 2**20:.0f} MiB; `--data.prefetch "
             f"{cfg.data.prefetch}`; {os.cpu_count()} CPU cores, shared."
             f"\n\nThe prefetch threads alone ({workers} of them) fetch and tokenise {capacity:.0f} pages/s here, "
             f"enough for up to {capacity * cfg.data.page_size * args.seq_len:,.0f} tokens/s; a page costs one row "
             "group's text column (read and decoded whole) and tokenising its first rows.")
    if args.no_record:
        print(body)
    else:
        record("data-wait", "(e) Data wait at a GPU-like step rate", "python bench/data_wait.py " + " ".join(sys.argv[1:]),
               body)


if __name__ == "__main__":
    main()
