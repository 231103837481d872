"""One small tokenizer interface over the offline GPT-2 BPE and any Hub tokenizer.

Why a wrapper: data pages must be identical on every miner and validator, so
callers need a stable ``digest`` identifying the exact vocabulary, plus the
vocab size / EOS id the model needs, without caring where the tokenizer came
from. Loading is lazy: nothing is read or downloaded until ``load_tokenizer``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "TOKENIZER_SOURCES"]

TOKENIZER_SOURCES = ("local", "hf")
_GPT2_VOCAB_SIZE = 50257


class TokenizerError(RuntimeError):
    """A tokenizer could not be loaded (the message names the fix)."""


@dataclass(frozen=True)
class Tokenizer:
    """Immutable handle: ``encode`` text to ids; ``digest`` pins the exact vocabulary."""

    name: str
    vocab_size: int
    eos_id: int
    digest: str
    hf: Any = field(repr=False, compare=False)  # transformers tokenizer (e.g. for save_pretrained)

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` with no BOS/EOS added (callers add EOS between documents)."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            return list(backend.encode(text, add_special_tokens=False).ids)
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like ``encode`` per text, but parallel (Rust threads) when the backend allows."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            return [list(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(ids)))


def _sha256_files(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _hf_digest(tok: Any) -> str:
    """sha256 of the canonical vocab JSON (+ BPE merges when present): same vocab -> same digest."""
    payload: dict[str, Any] = {"vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1])}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        payload["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _eos_id(tok: Any, name: str) -> int:
    eos = tok.eos_token_id
    if eos is None:
        raise TokenizerError(f"tokenizer {name!r} has no EOS token; pick a tokenizer with one (e.g. 'gpt2')")
    return int(eos)


def _load_local(assets_dir: Path | str | None) -> Tokenizer:
    from transformers import GPT2Tokenizer  # lazy: transformers import is slow

    from distributed_training.data.assets import require_assets

    paths = require_assets(assets_dir)
    vocab = json.loads(paths.vocab_path.read_text(encoding="utf-8"))
    lines = paths.merges_path.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    # transformers 5 takes vocab=/merges= objects; the old vocab_file= kwargs silently build an EMPTY tokenizer.
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    if len(tok) != _GPT2_VOCAB_SIZE:
        raise TokenizerError(
            f"local tokenizer has {len(tok)} tokens, expected {_GPT2_VOCAB_SIZE}; run `dt-assets` to rebuild it"
        )
    return Tokenizer(
        name="local:gpt2",
        vocab_size=len(tok),
        eos_id=_eos_id(tok, "local:gpt2"),
        digest=_sha256_files(paths.vocab_path, paths.merges_path),
        hf=tok,
    )


def _load_hf(hf_name: str) -> Tokenizer:
    from transformers import AutoTokenizer  # lazy: may hit the Hub, only when asked

    try:
        tok = AutoTokenizer.from_pretrained(hf_name)
    except Exception as e:  # noqa: BLE001 - HF raises many types (OSError, HTTP, ValueError)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerError(
            f"could not load Hugging Face tokenizer {hf_name!r} ({type(e).__name__}: {first}); "
            "check Hub access / the name, or use the offline tokenizer (source 'local')"
        ) from e
    return Tokenizer(
        name=f"hf:{hf_name}",
        vocab_size=len(tok),
        eos_id=_eos_id(tok, hf_name),
        digest=_hf_digest(tok),
        hf=tok,
    )


def load_tokenizer(source: str, assets_dir: Path | str | None = None, hf_name: str = "gpt2") -> Tokenizer:
    """``source='local'``: GPT-2 BPE from ``dt-assets`` files; ``'hf'``: ``AutoTokenizer(hf_name)`` (name or dir)."""
    if source == "local":
        return _load_local(assets_dir)
    if source == "hf":
        return _load_hf(hf_name)
    raise ValueError(f"unknown tokenizer source {source!r}; valid: {', '.join(TOKENIZER_SOURCES)}")
