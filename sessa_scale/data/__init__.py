"""Training data: tokenizers, corpora and resumable batch streams."""

from sessa_scale.data.corpus import TokenCorpus, load_corpus
from sessa_scale.data.loader import BatchStream
from sessa_scale.data.tokenizer import ByteTokenizer

__all__ = ["BatchStream", "ByteTokenizer", "TokenCorpus", "load_corpus"]
