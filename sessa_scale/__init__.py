"""sessa_scale: pretraining Sessa language models (arXiv 2604.18580) at scale."""

__version__ = "0.1.0"
