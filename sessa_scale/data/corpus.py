"""The embedded default corpus: the running interpreter's standard-library Python sources,
byte-level. It needs no download and is the same on every machine with the same Python version.
It goes through the same pipeline as any corpus: `prepare_stdlib` writes it once as a prepared
dataset (dataset.py) into a cache directory keyed by a hash of its content and settings, and
training reads it with the same loader."""

from __future__ import annotations

import hashlib
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from sessa_scale.config import DataConfig
from sessa_scale.data.dataset import MANIFEST, VERSION, write_dataset
from sessa_scale.errors import UserError

# The stdlib split is a property of the cached dataset, not of the run: its seed is fixed.
STDLIB_SPLIT_SEED = 0


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else $SESSA_SCALE_CACHE, else ~/.cache/sessa_scale."""
    return Path(cfg.cache_dir or os.environ.get("SESSA_SCALE_CACHE") or Path.home() / ".cache" / "sessa_scale")


def _stdlib_documents() -> tuple[Path, list[Path]]:
    """The standard library's .py files (installed packages excluded), in a fixed pseudo-random
    order (by CRC32 of the relative path), so any byte budget samples the whole library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()]
    files.sort(key=lambda p: (zlib.crc32(str(p.relative_to(root)).encode()), str(p)))
    return root, files


def stdlib_documents(corpus_bytes: int) -> list[bytes]:
    """Up to corpus_bytes of standard-library sources, one document per file (the last one cut)."""
    _, files = _stdlib_documents()
    docs: list[bytes] = []
    total = 0
    for path in files:
        if total >= corpus_bytes:
            break
        data = path.read_bytes()[: corpus_bytes - total]
        if data:
            docs.append(data)
            total += len(data)
    return docs


def prepare_stdlib(cfg: DataConfig) -> Path:
    """The prepared dataset of the embedded corpus for cfg (corpus_bytes, seq_len, val_fraction),
    written on first use under cache_root(cfg)/datasets/. Safe to call from several processes."""
    docs = stdlib_documents(cfg.corpus_bytes)
    key = hashlib.sha256(f"v{VERSION}/{cfg.seq_len}/{cfg.val_fraction}/{STDLIB_SPLIT_SEED}".encode())
    for doc in docs:
        key.update(len(doc).to_bytes(8, "little") + doc)
    out = cache_root(cfg) / "datasets" / f"stdlib-py{sysconfig.get_python_version()}-{key.hexdigest()[:16]}"
    if (out / MANIFEST).is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the dataset cache {out.parent} ({exc.strerror}); set data.cache_dir") from None
    try:
        write_dataset(
            (np.frombuffer(d, dtype=np.uint8) for d in docs),
            out,
            seq_len=cfg.seq_len,
            val_fraction=cfg.val_fraction,
            seed=STDLIB_SPLIT_SEED,
        )
    except UserError:
        if not (out / MANIFEST).is_file():  # not a concurrent writer having finished first
            raise
    return out
