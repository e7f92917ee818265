"""Worker for tests/distributed/test_tensor_parallel.py, run under torchrun with 2 processes (gloo):
for each case, a tp=1 model and a tp=2 (optionally sequence-parallel) model from the same seed
take the same batch; rank 0 saves both losses, logits and full gradients (TP shards gathered)."""

import sys

import tests.distributed.cpu_collectives  # noqa: F401  (test-only CUDA->CPU mapping, see there)

import torch
import torch.distributed as dist

from sessa_scale.config.schema import ModelConfig
from sessa_scale.distributed.groups import init_model_parallel, tensor_parallel_group
from sessa_scale.distributed.tensor_parallel import parallelize
from sessa_scale.distributed.tp_plan import merge_state_dicts
from sessa_scale.models.registry import build_model

CASES = {
    # one feedback head (q_b/k_b replicated), GQA, tied embeddings, awkward T, no SP
    "fb1_gqa_T17": (dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258), 17, False),
    # sharded feedback heads, sequence parallel, untied head, activation checkpointing
    "fb2_sp_T18": (
        dict(d_model=32, n_layers=2, n_heads=2, n_fb_heads=2, vocab_size=260, tie_embeddings=False,
             activation_checkpointing=True),
        18, True,
    ),
    # one feedback head under sequence parallelism, scaled init, longer T
    "fb1_sp_T66": (dict(d_model=24, n_layers=1, n_heads=2, vocab_size=258, init="scaled"), 66, True),
    # the Transformer baseline, GELU MLP without SP, SwiGLU with SP
    "transformer_gelu_T17": (dict(arch="transformer", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258), 17, False),
    "transformer_swiglu_sp_T18": (
        dict(arch="transformer", d_model=32, n_layers=2, n_heads=2, mlp="swiglu", vocab_size=258, tie_embeddings=False),
        18, True,
    ),
    # the Mamba-2 baseline: 2 B/C groups (one per rank), without and with SP; T > ssm_chunk
    "mamba2_T17": (
        dict(arch="mamba2", d_model=32, n_layers=2, vocab_size=258, ssm_state=8, ssm_head_dim=8, ssm_groups=2,
             ssm_chunk=16),
        17, False,
    ),
    "mamba2_sp_T34": (
        dict(arch="mamba2", d_model=32, n_layers=2, vocab_size=258, ssm_state=8, ssm_head_dim=16, ssm_groups=4,
             ssm_chunk=16, tie_embeddings=False, init="scaled"),
        34, True,
    ),
}


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def gathered(cfg, group, local: dict) -> dict:
    shards = [None] * group.size()
    dist.all_gather_object(shards, local, group=group)
    return merge_state_dicts(cfg, shards)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    layout = init_model_parallel(2, sequence_parallel=True)
    group = tensor_parallel_group()
    results = {}
    for name, (fields, T, sp) in CASES.items():
        cfg = ModelConfig(**fields)
        torch.manual_seed(7)
        tokens = torch.randint(0, cfg.vocab_size, (2, T + 1))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        torch.manual_seed(11)
        ref = build_model(cfg)
        torch.manual_seed(11)
        par = parallelize(build_model(cfg), group, sequence_parallel=sp)
        ref_loss = ref(inputs, targets)
        ref_loss.backward()
        par_loss = par(inputs, targets)
        par_loss.backward()
        with torch.no_grad():
            ref_logits, par_logits = ref(inputs), par(inputs)
        local = grads(par)
        par_grads = gathered(cfg, group, local)
        # a replicated parameter must get the same (full) gradient on every TP rank
        replicated = {n: g for n, g in local.items() if not getattr(par.get_parameter(n), "tensor_model_parallel", False)}
        others = [None] * group.size()
        dist.all_gather_object(others, replicated, group=group)
        spread = max((o[n] - g).abs().max().item() for o in others for n, g in replicated.items())
        results[name] = dict(
            ref_loss=ref_loss.item(), tp_loss=par_loss.item(), ref_logits=ref_logits, tp_logits=par_logits,
            ref_grads=grads(ref), tp_grads=par_grads, replicated_spread=spread, tp_sharded=[n for n, p in par.named_parameters()
                                                               if getattr(p, "tensor_model_parallel", False)],
        )
    if layout.tp_rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
