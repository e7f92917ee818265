"""The typed configuration schema. Every field's meaning, unit and default is documented here;
YAML files and `key=value` overrides set these fields by their dotted names (`model.d_model`).

The defaults are the embedded CPU default: `sessa-scale train` with no config trains the tiny
Sessa model on the byte-level Python-standard-library corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunConfig:
    name: str = "sessa-tiny"  # run name; also the default run directory runs/<name>
    dir: str | None = None  # run directory (checkpoints, metrics.jsonl, config.yaml); None -> runs/<name>
    seed: int = 1234  # seeds model init, data order and every RNG


@dataclass
class ModelConfig:
    arch: str = "sessa"  # architecture: sessa | transformer | mamba2, the registered ArchSpecs (sessa_scale/models/registry.py)
    vocab_size: int | str = 257  # embedding rows; the byte-level corpus uses 256 bytes + EOS (id 256). "auto": the dataset's tokenizer vocabulary (data.path / data.sources, else the byte-level corpus) padded up to a multiple of 128 x parallel.tensor (Megatron-LM's rule: TP-divisible, tensor-core friendly rows), resolved when the config is loaded (sessa_scale/config/vocab.py); RUN_DIR/config.yaml records the number
    d_model: int = 128  # model width D
    n_layers: int = 4  # number of decoder blocks
    n_heads: int = 4  # forward-attention heads H (head dim = d_model / n_heads)
    n_kv_heads: int | None = None  # key/value heads for GQA; None -> n_heads
    n_fb_heads: int = 1  # Sessa feedback heads H_b (1 = the paper's single feedback head of width D)
    rope: bool = True  # rotary position embedding on the forward-attention branch
    gamma_max: float = 0.999  # Sessa feedback gain bound, in (0, 1)
    ln_eps: float = 1e-5  # LayerNorm epsilon
    tie_embeddings: bool = True  # share the input embedding and the LM head weight
    init: str = "pytorch"  # "pytorch": PyTorch default layer init (as the reference); "scaled": N(0, init_std), residual outputs / sqrt(2 n_layers)
    init_std: float = 0.02  # std of the embedding (both modes) and of weights under init="scaled"
    solver: str = "auto"  # feedback_solve implementation: auto | dense | chunked | triton
    attention: str = "sdpa"  # forward attention backend: sdpa | flash (flash-attn, CUDA only)
    activation_checkpointing: bool = False  # recompute each block in the backward pass to save memory
    residual_dtype: str = "float32"  # the residual stream between blocks under bf16 autocast: float32 (the embedding's dtype; every block adds into float32) | compute (cast to the autocast dtype after the embedding, so the stream, its LayerNorms' inputs and its gradient are bf16: Megatron-LM's default, fp32_residual_connection off; less memory traffic, more rounding). Without autocast both are the parameters' dtype
    init_from: str | None = None  # a directory written by `sessa-scale export`: a fresh run starts from its weights instead of the random init (the export must match every weight-shaping model key and the data's tokenizer); a resumed run loads its checkpoint instead
    # Transformer baseline (arch: transformer)
    mlp: str = "gelu"  # MLP of the Transformer block: gelu (Linear-GELU-Linear) | swiglu
    mlp_hidden: int | None = None  # MLP hidden width; None -> 4 d_model (gelu), ~8/3 d_model rounded to 64 (swiglu)
    # Mamba-2 baseline (arch: mamba2)
    ssm_state: int = 128  # SSD state size N per head
    ssm_head_dim: int = 64  # SSD head width P; heads = ssm_expand * d_model / ssm_head_dim
    ssm_expand: int = 2  # inner width = ssm_expand * d_model
    ssm_groups: int = 1  # groups of heads sharing B and C (must divide the head count)
    ssm_conv: int = 4  # causal depthwise conv kernel width
    ssm_chunk: int = 64  # SSD chunk length in tokens (a power of two >= 16; the triton scan runs chunks above 64 as 64)
    ssm_kernels: str = "auto"  # Mamba-2 causal conv + SiLU, gated RMSNorm, dt softplus and A = -exp(A_log): auto (fused Triton kernels on CUDA, else torch) | triton | torch (the PyTorch reference)
    ssm_scan: str = "auto"  # SSD scan: auto (triton on CUDA, else chunked) | triton (our kernels, kernels/ssd.py) | chunked (PyTorch) | sequential | fla (fla-core; wrong backward on Hopper with Triton < 3.7.1)
    ssm_keep_states: bool = True  # triton SSD scan: keep the forward's chunk states for the backward instead of recomputing them there (one state pass less per layer and step, the same gradients bit for bit): B H NC N P elements per layer (batch, heads, NC = ceil(T / min(ssm_chunk, 64)) chunks, ssm_state, ssm_head_dim) in the products' dtype (bf16 under bf16 autocast), e.g. 128 MiB per layer and 5.75 GiB over the 46 layers of the Mamba-2 350m at T = 8192, B = 2, for ~9 ms less of ~161 ms of GPU work per step; false: recompute them (less activation memory). Under activation_checkpointing only the layer being recomputed holds them


# ModelConfig keys that do not shape the weights: they may differ between a checkpoint (or an exported
# model) and the run that loads it.
RUNTIME_MODEL_KEYS = frozenset(
    {"solver", "attention", "activation_checkpointing", "residual_dtype", "init", "init_std", "init_from", "ssm_scan",
     "ssm_keep_states"}
)


@dataclass
class DataConfig:
    source: str = "stdlib"  # used when data.path and data.sources are null: "stdlib" = the running interpreter's standard-library .py sources, byte-level, prepared on first use into data.cache_dir
    seq_len: int = 256  # tokens per training sequence; a prepared dataset must have been made with this --seq-len
    path: str | None = None  # a prepared dataset (`sessa-scale prep INPUT --out DIR`): a directory, or a URL webdataset opens (http://, pipe:CMD; '{}' in it is replaced by each file name)
    sources: list | None = None  # a blend of prepared datasets: [{path: DIR_OR_URL, weight: W}, ...], W > 0, weights normalized; exclusive with data.path
    corpus_bytes: int = 16_000_000  # stdlib only: at most this many bytes of the embedded corpus are used
    val_fraction: float = 0.02  # stdlib only: fraction of documents held out for validation (prepared datasets fix theirs at prep time)
    cache_dir: str | None = None  # where the embedded corpus is prepared; None -> $SESSA_SCALE_CACHE or ~/.cache/sessa_scale
    shuffle_buffer: int = 10_000  # samples per seeded shuffle window (shard order is always shuffled per epoch); 1 = shard order only
    num_workers: int = 1  # DataLoader worker processes per rank (0 = read in the training process)
    prefetch: int = 4  # micro-batches each worker keeps ready
    verify_checksums: bool = True  # check each shard's sha256 the first time a reader process opens it (one extra read per shard and worker; sizes, tar headers and token ranges are always checked)


@dataclass
class OptimConfig:
    lr: float = 2e-3  # peak learning rate (AdamW)
    min_lr: float = 2e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 30  # linear warmup from 0 over this many optimizer steps
    decay_steps: int | None = None  # length of warmup + cosine decay in steps; None -> train.max_steps
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on biases, norms, gains)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient 2-norm to this value; 0 disables


@dataclass
class TrainConfig:
    max_steps: int = 400  # optimizer steps to train for
    micro_batch_size: int = 16  # sequences per forward pass per data-parallel rank
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer step
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16; bf16 = mixed precision: float32 weights, gradients and AdamW state, matrix products and the feedback solve in bfloat16 (DeepSpeed's torch_autocast; sessa_scale/training/precision.py)
    deterministic: bool = False  # deterministic GPU algorithms (torch.use_deterministic_algorithms, fixed cuBLAS workspace, no cuDNN autotuning) so that a resumed run repeats an uninterrupted one bitwise on GPUs too; costs some speed (CPU runs are deterministic either way)
    compile: bool = False  # torch.compile the model for training (in place through DeepSpeed's engine.compile: same state-dict keys and checkpoints as eager); the first step pays the compilation; evaluation runs eager; tested in one process (not with parallel.tensor > 1)
    compile_mode: str = "default"  # with compile: torch.compile mode, "default" or "max-autotune-no-cudagraphs" (inductor times Triton matmul templates against cuBLAS and fuses pointwise ops into the ones it picks: minutes more compilation, sometimes a faster step); CUDA-graph modes are not offered (DeepSpeed's hooks run between graphs)
    cuda_graphs: bool = False  # CUDA: replay each decoder block's forward and backward as CUDA graphs captured at start-up for the micro-batch shape (sessa_scale/training/cuda_graphs.py): the host issues 2 graph launches per block instead of every kernel, for models whose eager step is bound by the host (many light blocks: the 350M Mamba-2); embedding, head and loss stay eager, evaluation runs eager; not with train.compile, model.activation_checkpointing, parallel.tensor > 1 or zero.stage 1-3; ignored with a note on CPU
    eval_interval: int = 100  # evaluate validation loss every N steps (and at the end); 0 disables
    eval_batches: int = 4  # micro-batches per evaluation: val_loss is the mean over the first eval_batches x micro_batch_size x data-parallel ranks validation samples (a fixed subset, comparable across steps), while `sessa-scale eval --task ppl` scores the whole validation split
    profile_step: int = 0  # > 0: torch.profiler trace of that optimizer step (rank 0) -> RUN_DIR/profile/step_N.json (Chrome/Perfetto) and step_N.txt (ops by device time); 0: off
    resume: str = "auto"  # "auto": the newest complete checkpoint of run.dir (a fresh start only where run.dir holds no run); "none": fresh start, refused where run.dir holds a run; or a checkpoint / run path (refused when run.dir holds another run). Config changes on resume are printed and applied or refused (README, "Resume")
    skip_nonfinite_steps: int = 0  # steps in a row whose loss or gradient norm is NaN/inf that are skipped (no update, logged with "skipped": true); one more stops training with exit status 3, leaving `latest` on the last good checkpoint


@dataclass
class CheckpointConfig:
    interval: int = 100  # save every N optimizer steps (and at the end); 0 -> only at the end
    keep: int = 3  # keep the newest K checkpoints; older ones are deleted after a successful save
    save: bool = True  # false: write no checkpoint at all, not even at the end or on preemption (benchmarks, smoke runs: nothing to resume)


@dataclass
class ZeroConfig:
    stage: int = 0  # DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters) partitioned over the data-parallel ranks
    offload_optimizer: bool = False  # keep optimizer states in CPU memory and step there (DeepSpeedCPUAdam); needs zero.stage >= 1
    # Data-parallel communication (DeepSpeed's zero_optimization keys of the same names; see
    # sessa_scale/training/zero_communication.py). Sizes count elements, not bytes.
    overlap_comm: bool = True  # stages 1-3: reduce gradient buckets over the data-parallel ranks during the backward pass (on a side stream) instead of after it; costs about 2 reduce buckets of memory (double buffering)
    reduce_bucket_size: int = 50_000_000  # stages 1-3: gradient elements per reduction bucket (all-reduce / reduce-scatter); smaller buckets start reducing earlier in the backward pass, larger ones have less per-collective latency
    allgather_bucket_size: int = 50_000_000  # parameter elements per all-gather: stages 1-2 all-gather the updated parameter partitions after the step in buckets of this size; stage 3 prefetches parameters of the coming layers up to this many elements (DeepSpeed's stage3_prefetch_bucket_size)
    contiguous_gradients: bool = True  # stages 1-3: copy gradients into one contiguous buffer as they are produced (no memory fragmentation in the backward pass)


@dataclass
class ParallelConfig:
    tensor: int = 1  # tensor-parallel size (Megatron-style, heads and columns split over this many GPUs of a node); data-parallel size = world size / tensor
    sequence_parallel: bool = False  # with tensor > 1: keep norms and residual activations sharded along the sequence (less memory, same communication); ignored when tensor = 1


@dataclass
class LoggingConfig:
    progress: bool = True  # show a progress bar (loss, tokens/s, ETA) on rank 0
    wandb: bool = False  # log metrics to Weights & Biases
    wandb_project: str = "sessa-scale"
    wandb_mode: str = "offline"  # online | offline | disabled
    tensorboard: bool = False  # also write every metrics.jsonl value as a TensorBoard scalar to RUN_DIR/tensorboard/ (needs the `tensorboard` extra)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name
