"""The `train` config section: what the trainer, the optimizer and checkpointing read.

Kept apart from the loop so optimizer, accumulation and checkpoint code can take it without
importing the trainer.
"""

from dataclasses import dataclass, field

from vlm.models.lora import LoraSettings


@dataclass
class ModuleSettings:
    """Per top-level module (vision, projector, lm). None means: inherit (stage, train.weight_decay)."""

    trainable: bool | None = None
    lr_scale: float = 1.0  # multiplies train.lr
    weight_decay: float | None = None


@dataclass
class ParamOverride:
    """Escape hatch for finer groups: settings for parameters whose full name matches `pattern` (re.search)."""

    pattern: str = ""
    trainable: bool | None = None
    lr_scale: float | None = None
    weight_decay: float | None = None


@dataclass
class BenchmarkConfig:
    """`train.benchmarks` (lmms-eval tasks during training) and the settings of `python -m vlm.benchmark`."""

    tasks: list[str] = field(default_factory=list)  # lmms-eval task or group names; [] runs none
    every: int | None = None  # training: steps between runs (and at the end); null: with each validation
    limit: float | None = None  # at most this many samples per task (below 1: a fraction); null: the whole task
    batch_size: int = 8  # requests per forward (per process)
    max_new_tokens: int = 256  # for tasks that set none
    include_path: str | None = None  # a folder of one's own lmms-eval task YAMLs (local data)


@dataclass
class CheckpointSettings:
    # sharded: each process writes its part of weights and optimizer state (torch.distributed.checkpoint), no gather;
    # consolidated: one model.safetensors and optimizer state, gathered to process 0; auto: sharded under FSDP2
    format: str = "auto"
    # sharded checkpoints only: each process copies its shards to CPU memory and a thread writes them while training
    # goes on; the checkpoint appears once all are on disk (at the next save or the end of the run)
    async_save: bool = False


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = 1000
    global_batch_size: int = 32  # samples per optimizer step, over all processes
    micro_batch_size: int | None = None  # per process and forward; null: the whole per-process share
    # Optimizer and schedule.
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | linear | constant (each after linear warmup)
    lr_min_ratio: float = 0.1  # cosine decays to lr * lr_min_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    stage: str = "full"  # align (projector) | finetune (projector + lm) | full (everything)
    modules: dict[str, ModuleSettings] = field(default_factory=dict)
    param_overrides: list[ParamOverride] = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)  # LoRA adapters (vlm/models/lora.py)
    # Stability.
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs CUDA; it uses a grad scaler)
    activation_checkpointing: bool = False
    compile: str = "off"  # off | core (_forward_core whole) | regional (each vision/LM block); see compile_policy.py
    # Memory.
    simulate_oom_above: int | None = None  # testing: micro-batches above this many samples raise OOM
    simulate_oom_above_tokens: int | None = None  # testing: ... or above this many tokens (batch x length)
    simulate_oom_in: str = "forward"  # forward | backward: where the simulated OOM strikes
    simulate_oom_on_process: int | None = None  # testing: only this process (rank) runs out; null: every one
    cuda_alloc_conf: str = "expandable_segments:True"  # PYTORCH_CUDA_ALLOC_CONF unless already set; "" leaves it
    cpu_keep_freed_bytes: int = 1 << 30  # glibc keeps this much freed memory for the next step; 0: glibc default
    # Logging, evaluation, checkpoints.
    log_every: int = 10
    eval_every: int = 500
    eval_samples: int = 256
    eval_batch_size: int = 128
    eval_table_rows: int = 16  # predictions (with images) sent to the tracker at each evaluation
    max_new_tokens: int = 8
    save_every: int = 0  # steps between resumable checkpoints; 0: only at the end and on a stop signal
    keep_last: int = 2
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    best_metric: str | None = "val_accuracy"  # keep the best checkpoint by this metric (val_* or bench/*); null: off
    benchmarks: BenchmarkConfig = field(default_factory=BenchmarkConfig)  # lmms-eval scores (vlm/harness/)
    init_from: str | None = None  # checkpoint whose weights start this run (e.g. finetune after align)
    resume: str | None = None  # null | auto (newest valid checkpoint of this run directory) | PATH
