"""Corpus preparation: text / JSONL / Parquet inputs (inputs.py) tokenized in parallel into a
sessa_scale dataset directory (prep.py; the format lives in sessa_scale/data/dataset.py).
Command line: `sessa-scale prep INPUT ... --out DIR`."""
