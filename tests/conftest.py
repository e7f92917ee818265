"""Shared by the whole suite. DeepSpeed picks its accelerator from DS_ACCELERATOR when first used: on a
machine without CUDA, the cpu one (what the trainer sets before it starts DeepSpeed), set here once for
every test rather than by each module that trains or calls DeepSpeed. Left alone where CUDA is
available, so that `-m gpu` tests run on it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
