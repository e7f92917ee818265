"""Opening prepared datasets and reading their samples by (shard, offset).

A dataset location is a local directory, or a URL that webdataset's `gopen` opens (http(s)://,
`pipe:COMMAND`, ...). File names are appended to a URL after a '/', or substituted for '{}' when
the location contains it (`pipe:aws s3 cp s3://bucket/ds/{} -`).

Local shards are read by random access (one pread of one sample); other locations are fetched
a shard at a time and kept in a small cache. Integrity: a local shard's size must match the
manifest when opened, every sample's tar header must name the expected key and the .npy header
must match, and with `verify=True` each shard's sha256 is checked the first time a process opens
it (fetched shards are always checked). Token ids >= the vocabulary size are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sessa_scale.data.dataset import FORMAT, MANIFEST, TAR_BLOCK, VERSION, SampleLayout, TarHeaders, member_name
from sessa_scale.errors import UserError

_REMOTE_CACHE_SHARDS = 2


def is_local(location: str) -> bool:
    return "://" not in location and not location.startswith("pipe:")


def resolve(location: str, name: str) -> str:
    if "{}" in location:
        return location.replace("{}", name)
    return str(Path(location) / name) if is_local(location) else location.rstrip("/") + "/" + name


def _read_bytes(url: str) -> bytes:
    if is_local(url):
        return Path(url).read_bytes()
    import webdataset

    with webdataset.gopen(url, "rb") as stream:
        return stream.read()


@dataclass
class SplitInfo:
    """One split of a dataset: where its shards are and how they are laid out."""

    location: str
    split: str
    manifest: dict
    shards: list[dict]
    layout: SampleLayout

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    def first_key(self, shard: int) -> int:
        return sum(s["samples"] for s in self.shards[:shard])


def load_manifest(location: str | Path) -> dict:
    """The manifest of the dataset at `location`, checked for format and version."""
    location = str(location)
    where = resolve(location, MANIFEST)
    if is_local(location):
        if not Path(location).is_dir():
            raise UserError(f"dataset {location} does not exist; prepare one with `sessa-scale prep INPUT --out {location}`")
        if not Path(where).is_file():
            raise UserError(f"{location} holds no {MANIFEST}: not a prepared dataset (make one with `sessa-scale prep`)")
    try:
        manifest = json.loads(_read_bytes(where))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the dataset manifest {where}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(
            f"{where} is not a sessa_scale dataset manifest of version {VERSION} (format {manifest.get('format')!r}, "
            f"version {manifest.get('version')!r}); re-run `sessa-scale prep` with this version"
        )
    return manifest


def open_split(location: str | Path, split: str, manifest: dict | None = None) -> SplitInfo:
    """A split of the dataset at `location`; missing local shards are reported all at once."""
    location = str(location)
    manifest = manifest or load_manifest(location)
    shards = manifest["splits"][split]["shards"]
    if not shards:
        raise UserError(f"dataset {location} has no {split} samples; re-run prep with more data or another --val-fraction")
    if is_local(location):
        missing = [s["file"] for s in shards if not (Path(location) / s["file"]).is_file()]
        if missing:
            raise UserError(
                f"dataset {location}: {len(missing)} shard(s) listed in {MANIFEST} are missing: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; copy them back or re-run `sessa-scale prep`"
            )
    layout = SampleLayout(int(manifest["sample_tokens"]), np.dtype(manifest["dtype"]).newbyteorder("<"))
    return SplitInfo(location, split, manifest, shards, layout)


class SampleReader:
    """Reads samples of one split; one per process (file handles and caches are process-local)."""

    def __init__(self, info: SplitInfo, verify: bool = True):
        self.info, self.verify = info, verify
        self.layout = info.layout
        self.header = self.layout.header
        self.tar_headers = TarHeaders(self.layout)
        self.vocab_size = int(info.tokenizer["vocab_size"])
        self.key_base = np.concatenate([[0], np.cumsum([s["samples"] for s in info.shards])])
        self._fds: dict[int, int] = {}
        self._blobs: OrderedDict[int, bytes] = OrderedDict()

    def _url(self, shard: int) -> str:
        return resolve(self.info.location, self.info.shards[shard]["file"])

    def _corrupt(self, shard: int, what: str) -> UserError:
        return UserError(
            f"shard {self._url(shard)} is corrupt or truncated ({what}); restore it or re-run `sessa-scale prep` "
            "for this dataset"
        )

    def _check_sha(self, shard: int, digest: str) -> None:
        if digest != self.info.shards[shard]["sha256"]:
            raise self._corrupt(shard, f"sha256 {digest[:16]}... differs from the manifest's {self.info.shards[shard]['sha256'][:16]}...")

    def _open_local(self, shard: int) -> int:
        path = self._url(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise UserError(f"cannot open shard {path}: {exc.strerror}; copy it back or re-run `sessa-scale prep`") from None
        size = os.fstat(fd).st_size
        if size != self.info.shards[shard]["bytes"]:
            os.close(fd)
            raise self._corrupt(shard, f"{size} bytes, the manifest says {self.info.shards[shard]['bytes']}")
        if self.verify:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            self._check_sha(shard, h.hexdigest())
        self._fds[shard] = fd
        return fd

    def _fetch(self, shard: int) -> bytes:
        blob = self._blobs.get(shard)
        if blob is None:
            try:
                blob = _read_bytes(self._url(shard))
            except Exception as exc:  # any transport failure of gopen
                raise UserError(f"cannot fetch shard {self._url(shard)}: {exc}") from None
            if len(blob) != self.info.shards[shard]["bytes"]:
                raise self._corrupt(shard, f"{len(blob)} bytes, the manifest says {self.info.shards[shard]['bytes']}")
            self._check_sha(shard, hashlib.sha256(blob).hexdigest())
            self._blobs[shard] = blob
            while len(self._blobs) > _REMOTE_CACHE_SHARDS:
                self._blobs.popitem(last=False)
        return blob

    def read(self, shard: int, offset: int) -> np.ndarray:
        """Sample `offset` of shard `shard` (manifest order): (sample_tokens,) array of the dataset dtype."""
        stride, start = self.layout.stride, offset * self.layout.stride
        if is_local(self.info.location):
            fd = self._fds.get(shard)
            raw = os.pread(self._open_local(shard) if fd is None else fd, stride, start)
        else:
            raw = self._fetch(shard)[start : start + stride]
        key = int(self.key_base[shard]) + offset
        npy_end = TAR_BLOCK + len(self.header)
        if len(raw) != self.layout.stride or raw[:TAR_BLOCK] != self.tar_headers(key) or raw[TAR_BLOCK:npy_end] != self.header:
            raise self._corrupt(shard, f"sample {offset} is not {member_name(key)} in the manifest's layout")
        tokens = np.frombuffer(raw, dtype=self.layout.dtype, count=self.layout.sample_tokens, offset=npy_end)
        if int(tokens.max()) >= self.vocab_size:
            raise self._corrupt(shard, f"sample {offset} holds token id {int(tokens.max())} >= vocab size {self.vocab_size}")
        return tokens

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._blobs.clear()
