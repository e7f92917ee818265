"""Training data: the tokenized dataset format, its writer, and resumable blended streams.

Write a dataset from Python (documents as str, bytes or token-id lists; EOS is appended to each):

    from sessa_scale.data import ByteTokenizer, HFTokenizer, write_dataset
    manifest = write_dataset(docs, "data/mqar", tokenizer=ByteTokenizer(), seq_len=2048,
                             val_fraction=0.01, seed=0)

For streaming or pre-tokenized input, `DatasetWriter(out_dir, tokenizer.identity(), seq_len,
val_fraction, seed)` takes one document at a time with `.add(token_ids)` and `.close(stats)`.
Train on it with `data.path=data/mqar` (or blend with `data.sources`). The format (dataset.py):
webdataset tar shards of packed (seq_len + 1)-token samples (`KEY.npy`) + manifest.json; any
webdataset pipeline reads them with `.decode()`.

Modules: dataset.py (format, writer), tokenizer.py (byte-level, tokenizer.json), reader.py
(manifests, random-access sample reads, integrity checks), order.py (global sample order:
shuffles and blending), loader.py (per-rank streams, DataLoader workers, resume state),
corpus.py (the embedded stdlib corpus), setup.py (config -> the trainer's streams; `load_corpus`:
the validation split as one token stream, for evaluation).
"""

from sessa_scale.data.dataset import DatasetWriter, write_dataset
from sessa_scale.data.loader import ShardStream, StreamSpec
from sessa_scale.data.setup import TokenCorpus, load_corpus
from sessa_scale.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = [
    "ByteTokenizer",
    "DatasetWriter",
    "HFTokenizer",
    "ShardStream",
    "StreamSpec",
    "TokenCorpus",
    "load_corpus",
    "write_dataset",
]
