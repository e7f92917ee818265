"""Shared by the data and prep tests: a dataset split read back without sessa_scale's reader."""

import io
import tarfile

import numpy as np

from sessa_scale.data.reader import load_manifest


def tar_samples(path, split: str) -> dict[int, np.ndarray]:
    """Every sample of a split read with tarfile, an independent reader: {key: tokens (int64)}."""
    out = {}
    for shard in load_manifest(path)["splits"][split]["shards"]:
        with tarfile.open(f"{path}/{shard['file']}") as tf:
            for member in tf.getmembers():
                out[int(member.name.split(".")[0])] = np.load(io.BytesIO(tf.extractfile(member).read())).astype(np.int64)
    return out
