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


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()
    )
    return root, files


def _is_validation(relative_path: str, val_fraction: float) -> bool:
    """Deterministic document-level split: a path goes to validation by its CRC32 bucket."""
    return zlib.crc32(relative_path.encode()) % 10_000 < round(val_fraction * 10_000)


def load_stdlib_corpus(cfg: DataConfig) -> TokenCorpus:
    """Read up to cfg.corpus_bytes of standard-library sources (sorted by path), one document per
    file, each followed by EOS."""
    tokenizer = ByteTokenizer()
    root, files = _stdlib_files()
    streams: dict[bool, list[bytes]] = {False: [], True: []}
    eos = bytes([0])  # placeholder byte, replaced by the EOS id below
    total = 0
    for path in files:
        if total >= cfg.corpus_bytes:
            break
        data = path.read_bytes()[: cfg.corpus_bytes - total]
        if not data:
            continue
        total += len(data)
        streams[_is_validation(str(path.relative_to(root)), cfg.val_fraction)].append(data + eos)
    if not streams[False] or not streams[True]:
        raise UserError(
            f"data.source=stdlib: the standard library at {root} gave too little text for a train/validation "
            f"split with data.corpus_bytes={cfg.corpus_bytes} and data.val_fraction={cfg.val_fraction}; "
            "raise data.corpus_bytes or data.val_fraction."
        )

    def to_tokens(docs: list[bytes]) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(b"".join(docs)), dtype=torch.uint8).to(torch.int16)
        ends = torch.tensor([len(d) for d in docs]).cumsum(0) - 1  # positions of the placeholders
        raw[ends] = tokenizer.eos_id
        return raw

    return TokenCorpus(
        train=to_tokens(streams[False]),
        val=to_tokens(streams[True]),
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        description=f"Python {sysconfig.get_python_version()} standard library ({total / 1e6:.1f} MB, byte-level)",
    )


def load_corpus(cfg: DataConfig) -> TokenCorpus:
    """Load the corpus named by cfg.source."""
    if cfg.source == "stdlib":
        return load_stdlib_corpus(cfg)
    raise UserError(f"data.source: unknown source {cfg.source!r}; allowed: stdlib")
