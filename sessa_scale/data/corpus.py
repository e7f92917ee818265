"""The embedded default corpus: the running interpreter's standard-library Python sources,
tokenized byte-level. It needs no download and is the same on every machine with the same
Python version."""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from sessa_scale.config import DataConfig
from sessa_scale.data.tokenizer import ByteTokenizer
from sessa_scale.errors import UserError


@dataclass
class TokenCorpus:
    """A tokenized corpus split by document into train/val streams (1-D int16 token tensors)."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    eos_id: int
    description: str


def _stdlib_documents() -> tuple[Path, list[Path]]:
    """The standard library's .py files (installed packages excluded), in a fixed pseudo-random
    order (by CRC32 of the relative path), so any byte budget samples the whole library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()]
    files.sort(key=lambda p: (zlib.crc32(str(p.relative_to(root)).encode()), str(p)))
    return root, files


def load_stdlib_corpus(cfg: DataConfig) -> TokenCorpus:
    """Read up to cfg.corpus_bytes of standard-library sources, one document per file, each
    followed by EOS. The first documents, up to val_fraction of the bytes (at least one document),
    form the validation split; the rest train."""
    tokenizer = ByteTokenizer()
    root, files = _stdlib_documents()
    docs: list[bytes] = []
    total = 0
    for path in files:
        if total >= cfg.corpus_bytes:
            break
        data = path.read_bytes()[: cfg.corpus_bytes - total]
        if data:
            docs.append(data)
            total += len(data)
    n_val, val_bytes = 0, 0
    while n_val < len(docs) and (n_val == 0 or val_bytes < cfg.val_fraction * total):
        val_bytes += len(docs[n_val])
        n_val += 1
    if n_val >= len(docs):
        raise UserError(
            f"data.source=stdlib: {len(docs)} document(s) of the standard library at {root} within "
            f"data.corpus_bytes={cfg.corpus_bytes} leave nothing to train on after the validation split "
            f"(data.val_fraction={cfg.val_fraction}); raise data.corpus_bytes or lower data.val_fraction."
        )

    def to_tokens(parts: list[bytes]) -> torch.Tensor:
        tokens = torch.full((sum(len(d) + 1 for d in parts),), tokenizer.eos_id, dtype=torch.int16)
        body = torch.ones_like(tokens, dtype=torch.bool)
        body[torch.tensor([len(d) + 1 for d in parts]).cumsum(0) - 1] = False  # EOS positions
        tokens[body] = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).to(torch.int16)
        return tokens

    return TokenCorpus(
        train=to_tokens(docs[n_val:]),
        val=to_tokens(docs[:n_val]),
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        description=f"Python {sysconfig.get_python_version()} standard library ({total / 1e6:.1f} MB, byte-level)",
    )


def load_corpus(cfg: DataConfig) -> TokenCorpus:
    """Load the corpus named by cfg.source."""
    if cfg.source == "stdlib":
        return load_stdlib_corpus(cfg)
    raise UserError(f"data.source: unknown source {cfg.source!r}; allowed: stdlib")
