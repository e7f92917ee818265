"""The tokenized dataset format (version 1): webdataset tar shards of packed token sequences plus
a manifest, and the writer that produces them.

    DIR/manifest.json       what is below, with a sha256 per shard (see `Manifest`)
    DIR/tokenizer.json      the Hugging Face tokenizer, when not byte-level
    DIR/train-000000.tar    training samples
    DIR/val-000000.tar      held-out validation samples

Packing happens at prep time: documents (each followed by EOS) are concatenated per split in
input order and cut into samples of seq_len + 1 tokens, sample i holding stream tokens
[i * seq_len, i * seq_len + seq_len + 1) (inputs = sample[:-1], targets = sample[1:], so
consecutive samples share one boundary token and no token is lost as a target). The tail shorter
than one sample is dropped and counted. Each sample is one tar member `KEY.npy`, KEY being the
sample's index within its split (10 digits), holding a 1-D uint16 (vocab <= 65536) or uint32
array in NumPy's .npy format, so any webdataset pipeline can `.decode()` it. Every member has the
same size and every header is a plain 512-byte ustar header with mtime 0, uid/gid 0 and no user
names: the same documents and seed give byte-identical shards, and sample j of a shard starts at
byte j * member_stride (which the loader uses for random access).

Which split a document lands in depends only on (seed, its index in the input order): see
`is_validation`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from sessa_scale.errors import UserError

FORMAT = "sessa_scale.tokens"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
KEY_DIGITS = 10
TAR_BLOCK = 512
DEFAULT_SHARD_BYTES = 64 * 2**20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def npy_header(sample_tokens: int, dtype: np.dtype) -> bytes:
    """The .npy header (magic, version, dict, padding) of a (sample_tokens,) array of `dtype`."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(sample_tokens, dtype=dtype), allow_pickle=False)
    return buf.getvalue()[: -sample_tokens * dtype.itemsize]


def member_name(key: int) -> str:
    return f"{key:0{KEY_DIGITS}d}.npy"


@dataclass(frozen=True)
class SampleLayout:
    """Byte layout of one sample in a shard: a 512-byte tar header, then the .npy member padded
    to a multiple of 512 bytes."""

    sample_tokens: int
    dtype: np.dtype

    @cached_property
    def header(self) -> bytes:
        return npy_header(self.sample_tokens, self.dtype)

    @cached_property
    def member_size(self) -> int:
        return len(self.header) + self.sample_tokens * self.dtype.itemsize

    @cached_property
    def stride(self) -> int:
        return TAR_BLOCK + -(-self.member_size // TAR_BLOCK) * TAR_BLOCK


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class TarHeaders:
    """The ustar header of each sample (mode 0644, mtime 0, uid/gid 0, no user names). `tarfile`
    makes it once; per key only the name and the header checksum change, which are patched in
    (byte for byte what tarfile would write, at a fraction of the cost)."""

    def __init__(self, layout: SampleLayout):
        info = tarfile.TarInfo(member_name(0))
        info.size, info.mtime, info.mode = layout.member_size, 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._template = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
        self._template[148:156] = b" " * 8  # the checksum field counts as spaces
        self._name_len = len(member_name(0))
        self._base_sum = sum(self._template) - sum(self._template[: self._name_len])

    def __call__(self, key: int) -> bytes:
        name = member_name(key).encode()
        header = self._template
        header[: self._name_len] = name
        header[148:156] = b"%06o\0 " % (self._base_sum + sum(name))
        return bytes(header)


class ShardWriter:
    """Writes one deterministic tar shard, samples in key order (see TarHeaders)."""

    def __init__(self, path: Path, layout: SampleLayout):
        self.path, self.layout, self.samples = path, layout, 0
        self._file = open(path, "wb")
        self._headers = TarHeaders(layout)
        self._padding = bytes(layout.stride - TAR_BLOCK - layout.member_size)

    def write(self, key: int, tokens: np.ndarray) -> None:
        self._file.write(self._headers(key))
        self._file.write(self.layout.header)
        self._file.write(tokens.astype(self.layout.dtype, copy=False).tobytes())
        self._file.write(self._padding)
        self.samples += 1

    def close(self) -> dict:
        """Finish the tar (two zero blocks, padded to tarfile's 10240-byte records); returns the
        manifest entry {file, samples, bytes, sha256}."""
        size = self.samples * self.layout.stride + 2 * TAR_BLOCK
        self._file.write(bytes(2 * TAR_BLOCK + (-size) % tarfile.RECORDSIZE))
        self._file.close()
        return {"file": self.path.name, "samples": self.samples, "bytes": self.path.stat().st_size, "sha256": file_sha256(self.path)}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_validation(seed: int, doc_index: int, val_fraction: float) -> bool:
    """Whether document `doc_index` (0-based, input order) is held out: the first document (so a
    small corpus still has a validation split) and every document whose seeded hash of the index
    falls below val_fraction; it does not depend on worker count or chunking."""
    if val_fraction <= 0:
        return False
    if doc_index == 0:
        return True
    digest = hashlib.sha256(f"sessa_scale/val/{seed}/{doc_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") < val_fraction * 2**64


class _SplitPacker:
    """Packs one split's documents into samples and rolls shards."""

    def __init__(self, out: Path, split: str, seq_len: int, layout: SampleLayout, samples_per_shard: int):
        self.out, self.split, self.seq_len, self.layout = out, split, seq_len, layout
        self.samples_per_shard = samples_per_shard
        self.carry = np.zeros(0, dtype=np.int64)
        self.samples = self.documents = self.tokens = 0
        self.shards: list[dict] = []
        self.writer: ShardWriter | None = None

    def add(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens += len(tokens)
        buf = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        n = max(0, (len(buf) - 1) // self.seq_len)
        for i in range(n):
            if self.writer is None:
                self.writer = ShardWriter(self.out / shard_name(self.split, len(self.shards)), self.layout)
            self.writer.write(self.samples, buf[i * self.seq_len : i * self.seq_len + self.seq_len + 1])
            self.samples += 1
            if self.writer.samples == self.samples_per_shard:
                self.shards.append(self.writer.close())
                self.writer = None
        self.carry = np.asarray(buf[n * self.seq_len :], dtype=np.int64)

    def close(self) -> dict:
        if self.writer is not None:
            self.shards.append(self.writer.close())
            self.writer = None
        return {
            "samples": self.samples,
            "documents": self.documents,
            "tokens": self.tokens,
            "dropped_tail_tokens": len(self.carry) if self.samples else self.tokens,
            "shards": self.shards,
        }


class DatasetWriter:
    """Builds a dataset directory from tokenized documents (see the module docstring).

    tokenizer: identity dict {kind, name, vocab_size, eos_id[, sha256, file]} (`Tokenizer.identity()`);
    tokenizer_file: a tokenizer.json to copy beside the shards. Writes into OUT.partial-PID and
    renames it to OUT on `close()`, so a crash never leaves a half-written dataset under OUT; when
    another process completed OUT meanwhile (and overwrite is off), its copy is kept."""

    def __init__(
        self,
        out_dir: str | Path,
        tokenizer: dict,
        seq_len: int,
        val_fraction: float = 0.0,
        seed: int = 0,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        tokenizer_file: str | Path | None = None,
        overwrite: bool = False,
    ):
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= val_fraction < 1:
            raise UserError(f"the validation fraction must be in [0, 1), got {val_fraction}")
        self.out = Path(out_dir)
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise UserError(f"output directory {self.out} exists and is not empty; pass --overwrite to replace it or choose another --out")
        self.overwrite = overwrite
        self.tmp = self.out.with_name(f"{self.out.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.tokenizer = dict(tokenizer)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, self.tmp / "tokenizer.json")
            self.tokenizer["file"] = "tokenizer.json"
        self.seq_len, self.val_fraction, self.seed = seq_len, val_fraction, seed
        self.vocab_size, self.eos_id = int(tokenizer["vocab_size"]), int(tokenizer["eos_id"])
        self.layout = SampleLayout(seq_len + 1, token_dtype(self.vocab_size))
        per_shard = max(1, shard_bytes // self.layout.stride)
        self.packers = {s: _SplitPacker(self.tmp, s, seq_len, self.layout, per_shard) for s in SPLITS}
        self.next_index = 0

    def add(self, tokens: Sequence[int] | np.ndarray, doc_index: int | None = None) -> str:
        """Add one document's tokens (EOS appended here); returns the split it went to.
        doc_index defaults to the count of documents added so far."""
        doc_index = self.next_index if doc_index is None else doc_index
        self.next_index = doc_index + 1
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1:
            raise UserError(f"document {doc_index}: expected a 1-D sequence of token ids, got shape {arr.shape}")
        if len(arr) and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise UserError(
                f"document {doc_index}: token ids must lie in [0, {self.vocab_size}) for this tokenizer, got "
                f"[{arr.min()}, {arr.max()}]"
            )
        split = "val" if is_validation(self.seed, doc_index, self.val_fraction) else "train"
        self.packers[split].add(np.append(arr, self.eos_id))
        return split

    def abort(self) -> None:
        """Drop the partial output (OUT itself is untouched)."""
        for packer in self.packers.values():
            if packer.writer is not None:
                packer.writer._file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self, stats: dict | None = None, require_val: bool = True) -> dict:
        """Finish every shard, write manifest.json, move the directory into place; returns the manifest."""
        splits = {s: p.close() for s, p in self.packers.items()}
        need = ["train"] + (["val"] if require_val and self.val_fraction > 0 else [])
        for split in need:
            if splits[split]["samples"] == 0:
                self.abort()
                raise UserError(
                    f"the {split} split holds {splits[split]['documents']} document(s), {splits[split]['tokens']} tokens: "
                    f"not one sample of seq_len + 1 = {self.seq_len + 1} tokens. Add more input, lower --seq-len"
                    + (", or raise --val-fraction" if split == "val" else ", or lower --val-fraction")
                )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "seq_len": self.seq_len,
            "sample_tokens": self.seq_len + 1,
            "dtype": self.layout.dtype.name,
            "tokenizer": self.tokenizer,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "splits": splits,
            "stats": stats or {},
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if self.out.exists() and self.overwrite:
            shutil.rmtree(self.out)
        try:
            os.replace(self.tmp, self.out)
        except OSError:
            if self.overwrite or not (self.out / MANIFEST).is_file():
                raise
            shutil.rmtree(self.tmp)  # a concurrent writer finished first
        return manifest


def write_dataset(
    documents: Iterable[str | bytes | Sequence[int]],
    out_dir: str | Path,
    tokenizer=None,
    seq_len: int = 2048,
    val_fraction: float = 0.0,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> dict:
    """Write documents as a dataset directory; returns its manifest.

    documents: str (encoded with `tokenizer`), bytes (byte-level only) or sequences of token ids
    (written as given); EOS is appended to each. tokenizer: a `ByteTokenizer` (default) or
    `HFTokenizer` from sessa_scale.data.tokenizer."""
    from sessa_scale.data.tokenizer import ByteTokenizer

    tokenizer = tokenizer or ByteTokenizer()
    writer = DatasetWriter(
        out_dir, tokenizer.identity(), seq_len, val_fraction, seed, shard_bytes, getattr(tokenizer, "path", None), overwrite
    )
    for doc in documents:
        if isinstance(doc, str):
            doc = tokenizer.encode(doc)
        elif isinstance(doc, (bytes, bytearray)):
            if tokenizer.name != "byte":
                raise UserError("bytes documents can only be written with the byte-level tokenizer; pass str")
            doc = np.frombuffer(bytes(doc), dtype=np.uint8)
        writer.add(doc)
    return writer.close(require_val=val_fraction > 0)
