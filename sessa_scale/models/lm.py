"""The decoder-only language model shared by every architecture:
token embedding -> n_layers residual blocks -> final LayerNorm -> LM head.

Blocks come from a factory (see sessa_scale.models.registry) and follow the `Block` protocol.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sessa_scale.config.schema import ModelConfig


class Block(Protocol):
    """What DecoderLM needs from a residual block (an nn.Module mapping (B, T, D) -> (B, T, D))."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def residual_projections(self) -> list[nn.Linear]:
        """Linears whose output is added to the residual stream (scaled init divides their std)."""
        ...

    def default_init_modules(self) -> list[nn.Module]:
        """Modules that keep PyTorch's default init under init="scaled"."""
        ...

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None): ...

    def prefill(self, x: torch.Tensor, cache) -> tuple[torch.Tensor, object]: ...

    def decode_step(self, x_t: torch.Tensor, cache) -> tuple[torch.Tensor, object]: ...


class DecoderLM(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, V) (float32, or float64 for a float64 model)."""

    def __init__(self, cfg: ModelConfig, make_block: Callable[[int], Block]):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(make_block(i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.init == "scaled":
            self._scaled_init()
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _scaled_init(self) -> None:
        """Linear weights N(0, init_std) with zero bias, residual projections N(0, init_std / sqrt(2 L)),
        LayerNorms (1, 0); the blocks' default_init_modules keep PyTorch's init."""
        keep = {id(p) for block in self.layers for m in block.default_init_modules() for p in m.parameters()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in keep:
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.layers:
            for proj in block.residual_projections():
                nn.init.normal_(proj.weight, std=residual_std)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., D) -> logits (..., V), half precisions upcast to float32."""
        logits = self.lm_head(self.norm(x))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> the residual stream's start (B, T, D): the embedding, cast to the
        autocast dtype under model.residual_dtype = compute while autocast is on."""
        x = self.embed(tokens)
        device = x.device.type
        if self.cfg.residual_dtype == "compute" and torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        return x

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream through every block (recomputed in backward under activation_checkpointing)."""
        for block in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, V) (float32, or float64 for a float64 model); with
        targets (B, T) int64: the mean next-token cross-entropy instead (a scalar)."""
        logits = self._logits(self.run_blocks(self.embed_tokens(tokens)))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def init_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        """One empty decoding cache per block for up to max_len positions (default device/dtype: the
        embedding's)."""
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype if dtype is None else dtype
        return [block.init_cache(batch_size, device=device, dtype=dtype, max_len=max_len) for block in self.layers]

    def prefill(self, tokens: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        """Prompt tokens (B, T) on an empty cache -> (logits (B, T, V), cache)."""
        x = self.embed_tokens(tokens)
        for i, block in enumerate(self.layers):
            x, cache[i] = block.prefill(x, cache[i])
        return self._logits(x), cache

    def decode_step(self, token: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        """Next token (B,) int64 -> (logits (B, V), cache)."""
        x = self.embed_tokens(token)
        for i, block in enumerate(self.layers):
            x, cache[i] = block.decode_step(x, cache[i])
        return self._logits(x), cache

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample max_new_tokens after prompt (B, T0) int64 -> (B, T0 + max_new_tokens).

        temperature 0 picks the argmax (greedy); top_k keeps the k most likely tokens.
        """
        if max_new_tokens <= 0:
            return prompt
        cache = self.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits, cache = self.prefill(prompt, cache)
        logits = logits[:, -1]
        new_tokens = []
        for step in range(max_new_tokens):
            token = _sample(logits, temperature, top_k, generator)
            new_tokens.append(token)
            if step + 1 < max_new_tokens:
                logits, cache = self.decode_step(token, cache)
        return torch.cat([prompt, torch.stack(new_tokens, dim=1)], dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
