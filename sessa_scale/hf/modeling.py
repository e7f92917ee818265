"""transformers model classes around sessa_scale's DecoderLM, one per architecture, with the
recurrent / feedback / key-value state of sessa_scale's own decoding path as the generation cache.

`generate` runs exactly DecoderLM.generate's computation: the prompt through `prefill`, then one
`decode_step` per new token, on the blocks' own caches (SessaScaleCache). Batches padded on the
left (attention_mask zeros before the first one, as generate pads prompts) run each group of rows
with the same padding on its own unpadded tokens, so padding never enters a recurrent state; rows
padded on the right are fine in a cache-less forward (causality: later positions never change
earlier ones) and refused when generating.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from sessa_scale.hf.configuration import Mamba2BaselineConfig, SessaConfig, SessaScaleConfig, TransformerBaselineConfig
from sessa_scale.models.attention import rope_inv_freq
from sessa_scale.models.lm import DecoderLM
from sessa_scale.models.registry import build_model

# Positions a group's block caches hold beyond its prompt before they are first grown (then doubled).
_CACHE_HEADROOM = 128


class _RowGroup:
    """Rows of the batch that start at the same column (the same left padding) and their decoding
    state: DecoderLM's per-block caches for `capacity` positions, `length` of them filled."""

    def __init__(self, rows: torch.Tensor, start: int):
        self.rows, self.start = rows, start  # (R,) int64 batch indices; first real column
        self.blocks: list | None = None
        self.length = self.capacity = 0

    def prefill(self, model: DecoderLM, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (R, T) -> logits (R, T, V), the caches filled with them."""
        self.capacity = tokens.shape[1] + _CACHE_HEADROOM
        self.blocks = model.init_cache(tokens.shape[0], self.capacity)
        logits, self.blocks = model.prefill(tokens, self.blocks)
        self.length = tokens.shape[1]
        return logits

    def decode(self, model: DecoderLM, token: torch.Tensor) -> torch.Tensor:
        """token (R,) -> logits (R, V), one position appended to the caches (grown when full)."""
        if self.length == self.capacity:
            self._grow(model, 2 * self.capacity)
        logits, self.blocks = model.decode_step(token, self.blocks)
        self.length += 1
        return logits

    def _grow(self, model: DecoderLM, capacity: int) -> None:
        """Fresh caches for `capacity` positions holding the current ones: each tensor is copied into
        the leading slice of its larger counterpart (fixed-size states, e.g. Mamba-2's, are copied whole)."""
        fresh = model.init_cache(len(self.rows), capacity)
        for old, new in zip(self.blocks, fresh):
            for key, value in old.items():
                if isinstance(value, torch.Tensor):
                    new[key][tuple(slice(0, n) for n in value.shape)] = value
                else:
                    new[key] = value
        self.blocks, self.capacity = fresh, capacity

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: keep rows beam_idx (positions within this group)."""
        for block in self.blocks:
            for key, value in block.items():
                if isinstance(value, torch.Tensor):
                    block[key] = value.index_select(0, beam_idx.to(value.device))


class SessaScaleCache:
    """The decoding state of a batch: one _RowGroup per distinct left padding (one group when the
    batch is unpadded). Created by the model's first forward with use_cache; transformers' generate
    passes it back as `cache` (not a transformers Cache: the model builds its own, as Mamba's does)."""

    def __init__(self, batch_size: int, groups: list[_RowGroup]):
        self.batch_size, self.groups = batch_size, groups

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns consumed so far (prompt, left padding included, plus decoded tokens)."""
        group = self.groups[0]
        return group.start + group.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i of the new batch continues row beam_idx[i] (both within one padding group)."""
        for group in self.groups:
            positions = {int(row): i for i, row in enumerate(group.rows)}
            chosen = [int(beam_idx[int(row)]) for row in group.rows]
            if any(source not in positions for source in chosen):
                raise ValueError("beam search moved a row between differently padded prompts; pad the prompts alike")
            group.reorder(torch.tensor([positions[source] for source in chosen]))


def _left_padding(attention_mask: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
    """(B,) int64: leading zeros of each row of a (B, T) attention mask (T for a row of zeros)."""
    if attention_mask is None:
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    mask = attention_mask.to(torch.long)
    return torch.where(mask.any(dim=1), mask.argmax(dim=1), torch.full_like(mask[:, 0], mask.shape[1]))


class SessaScalePreTrainedModel(PreTrainedModel):
    config_class = SessaScaleConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def _init_weights(self, module) -> None:
        """Parameters come from the checkpoint; only the derived RoPE frequencies (a buffer the
        Transformer block does not save) are recomputed after transformers' meta-device loading."""
        if isinstance(getattr(module, "rope_inv_freq", None), torch.Tensor):
            with torch.no_grad():
                module.rope_inv_freq.copy_(rope_inv_freq(module.head_dim))


class SessaScaleForCausalLM(SessaScalePreTrainedModel, GenerationMixin):
    """DecoderLM of config.model_config() as a transformers causal LM. The subclasses, one per
    architecture, take that architecture's config class."""

    def __init__(self, config: SessaScaleConfig):
        super().__init__(config)
        if not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__} takes a {self.config_class.__name__}, not a {type(config).__name__}")
        self.model = build_model(config.model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is sessa_scale's own (SessaScaleCache), made by forward

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: SessaScaleCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, V) float32, and with use_cache the decoding state.

        cache None: the whole sequence (use_cache: through prefill, returning a new cache); a cache:
        input_ids are the next tokens after it, decoded one by one. labels (B, T): the mean
        next-token cross-entropy of logits[:, :-1] against labels[:, 1:] (-100 ignored) as `loss`.
        position_ids and other generate bookkeeping are ignored: positions follow from the cache.
        """
        if cache is not None:
            logits = self._decode_rows(input_ids, cache, attention_mask)
        elif use_cache:
            logits, cache = self._prefill_rows(input_ids, attention_mask)
        else:
            logits = self._forward_rows(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache or cache is not None else None)

    def _groups(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, generating: bool) -> list[_RowGroup]:
        """Rows grouped by their left padding; generating also refuses padding after a real token."""
        B, T = input_ids.shape
        start = _left_padding(attention_mask, B, input_ids.device)
        if generating and attention_mask is not None:
            columns = torch.arange(T, device=input_ids.device)
            if not bool((attention_mask.to(torch.bool) == (columns[None] >= start[:, None])).all()):
                raise ValueError(
                    "attention_mask has padding after a real token (right padding); generation needs prompts padded "
                    "on the left (tokenizer.padding_side = 'left') or unpadded"
                )
        return [_RowGroup(torch.nonzero(start == s).flatten(), int(s)) for s in torch.unique(start).tolist()]

    def _forward_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        groups = self._groups(input_ids, attention_mask, generating=False)
        if len(groups) == 1 and groups[0].start == 0:
            return self.model(input_ids)
        logits = self._empty_logits(input_ids)
        for g in groups:
            if g.start < input_ids.shape[1]:
                logits[g.rows, g.start :] = self.model(input_ids[g.rows, g.start :])
        return logits

    def _prefill_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        groups = self._groups(input_ids, attention_mask, generating=True)
        if any(g.start >= input_ids.shape[1] for g in groups):
            raise ValueError("a prompt is all padding; give every row at least one token")
        logits = self._empty_logits(input_ids)
        for g in groups:
            logits[g.rows, g.start :] = g.prefill(self.model, input_ids[g.rows, g.start :])
        return logits, SessaScaleCache(input_ids.shape[0], groups)

    def _decode_rows(self, input_ids: torch.Tensor, cache: SessaScaleCache, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"the cache holds {cache.batch_size} rows, the input {input_ids.shape[0]}")
        if attention_mask is not None and not bool(attention_mask[:, -input_ids.shape[1] :].all()):
            raise ValueError("attention_mask masks a decoded token; only prompts may be padded, on the left")
        logits = self._empty_logits(input_ids)
        for t in range(input_ids.shape[1]):
            for g in cache.groups:
                logits[g.rows, t] = g.decode(self.model, input_ids[g.rows, t])
        return logits

    def _empty_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) zeros in the logits dtype (padding positions keep them)."""
        dtype = torch.promote_types(self.model.embed.weight.dtype, torch.float32)
        return torch.zeros(*input_ids.shape, self.config.vocab_size, dtype=dtype, device=input_ids.device)


class SessaForCausalLM(SessaScaleForCausalLM):
    """A Sessa model (model.arch = sessa)."""

    config_class = SessaConfig


class TransformerBaselineForCausalLM(SessaScaleForCausalLM):
    """sessa_scale's Transformer baseline (model.arch = transformer)."""

    config_class = TransformerBaselineConfig


class Mamba2BaselineForCausalLM(SessaScaleForCausalLM):
    """sessa_scale's Mamba-2 baseline (model.arch = mamba2)."""

    config_class = Mamba2BaselineConfig


# model.arch -> its model class
CAUSAL_LM_CLASSES: dict[str, type[SessaScaleForCausalLM]] = {
    cls.config_class.arch: cls for cls in (SessaForCausalLM, TransformerBaselineForCausalLM, Mamba2BaselineForCausalLM)
}
