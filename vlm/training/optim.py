"""Optimizer, learning-rate schedule and which parameters train.

Each parameter gets its settings in three layers: the stage (align / finetune / full) decides
which top-level modules train; `train.modules.<name>` sets trainable, lr scale and weight decay per
module; `train.param_overrides` (regex on parameter names, first match wins) refines single
parameters. With LoRA (`train.lora.enabled`) the adapted modules (the LM, and the vision tower with
`train.lora.vision`) train through their adapters only, and `train.lora.modules_to_save` train fully.
No weight decay on biases, norm weights and embeddings by default (decaying them hurts and buys
nothing). Frozen parameters get requires_grad=False and stay out of the optimizer.
"""

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_scheduler

from vlm.config import ConfigError
from vlm.models.lora import in_module, is_adapter, weight_count
from vlm.training.train_config import ModuleSettings, TrainConfig

STAGES = {
    "align": {"projector"},
    "finetune": {"projector", "lm"},
    "full": None,  # every module
}
SCHEDULES = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class ParamSettings:
    trainable: bool
    lr_scale: float
    weight_decay: float


def _module_of(name: str) -> str:
    return name.split(".", 1)[0]


def _check_names(model: nn.Module, cfg: TrainConfig) -> None:
    if cfg.stage not in STAGES:
        raise ConfigError(f"train.stage={cfg.stage!r} is not one of: {', '.join(STAGES)}")
    modules = {_module_of(n) for n, _ in model.named_parameters()}
    unknown = set(cfg.modules) - modules
    if unknown:
        raise ConfigError(
            f"train.modules names modules the model does not have: {sorted(unknown)} (has {sorted(modules)})"
        )
    names = [n for n, _ in model.named_parameters()]
    for override in cfg.param_overrides:
        if not any(re.search(override.pattern, n) for n in names):
            raise ConfigError(f"train.param_overrides pattern {override.pattern!r} matches no parameter name")


def param_settings(model: nn.Module, cfg: TrainConfig) -> dict[str, ParamSettings]:
    """Settings for every parameter name, after stage, module settings and overrides."""
    _check_names(model, cfg)
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    staged = STAGES[cfg.stage]
    settings = {}
    for name, param in model.named_parameters():
        module = _module_of(name)
        per_module = cfg.modules.get(module, ModuleSettings())
        decays = param.ndim >= 2 and id(param) not in embeddings
        trainable = per_module.trainable if per_module.trainable is not None else (staged is None or module in staged)
        lr_scale = per_module.lr_scale
        weight_decay = per_module.weight_decay if per_module.weight_decay is not None else cfg.weight_decay
        weight_decay = weight_decay if decays else 0.0
        override = next((o for o in cfg.param_overrides if re.search(o.pattern, name)), None)
        if override is not None:
            trainable = trainable if override.trainable is None else override.trainable
            lr_scale = lr_scale if override.lr_scale is None else override.lr_scale
            weight_decay = weight_decay if override.weight_decay is None else override.weight_decay
        if cfg.lora.enabled:
            trainable = _trains_with_lora(name, module, trainable, cfg)
        settings[name] = ParamSettings(trainable, lr_scale, weight_decay)
    return settings


def _trains_with_lora(name: str, module: str, staged: bool, cfg: TrainConfig) -> bool:
    if is_adapter(name) or in_module(name, cfg.lora.modules_to_save):
        return True
    adapted = {"lm", "vision"} if cfg.lora.vision else {"lm"}
    return False if module in adapted else staged


def apply_trainable(model: nn.Module, settings: dict[str, ParamSettings]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(settings[name].trainable)


def parameter_groups(model: nn.Module, cfg: TrainConfig, settings: dict[str, ParamSettings]) -> list[dict]:
    """One optimizer group per (module, lr scale, weight decay) among trainable parameters."""
    groups: dict[tuple, list] = {}
    seen = set()
    for name, param in model.named_parameters():
        s = settings[name]
        if not s.trainable or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        groups.setdefault((_module_of(name), s.lr_scale, s.weight_decay), []).append(param)
    if not groups:
        raise ConfigError(f"train.stage={cfg.stage!r} with train.modules leaves no trainable parameter")
    return [
        {
            "params": params,
            "lr": cfg.lr * lr_scale,
            "weight_decay": weight_decay,
            "name": _group_name(module, lr_scale, weight_decay, groups),
        }
        for (module, lr_scale, weight_decay), params in groups.items()
    ]


def _group_name(module: str, lr_scale: float, weight_decay: float, groups: dict) -> str:
    """`lm`, `lm/no_decay`, and a suffix with the lr scale only where a module has several scales."""
    name = module if weight_decay else f"{module}/no_decay"
    scales = {scale for (m, scale, _) in groups if m == module}
    return name if len(scales) == 1 else f"{name}/x{lr_scale:g}"


def build_optimizer(model: nn.Module, cfg: TrainConfig, settings: dict[str, ParamSettings]) -> torch.optim.Optimizer:
    return adamw(parameter_groups(model, cfg, settings), cfg.lr, tuple(cfg.betas))


def adamw(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW, fused (one kernel pass over all parameters: on a CPU the foreach version spent a quarter of
    a small model's step in ten separate elementwise passes) where the parameters allow it, else foreach."""
    tensors = [p for group in params for p in group["params"]] if isinstance(params[0], dict) else list(params)
    fusable = all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in tensors
    )
    return torch.optim.AdamW(params, lr=lr, betas=betas, fused=fusable, foreach=None if fusable else True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then the chosen decay; one multiplier for all groups, so each keeps its own base lr."""
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule={cfg.schedule!r} is not one of: {', '.join(SCHEDULES)}")
    extra = {"min_lr_rate": cfg.lr_min_ratio} if cfg.schedule == "cosine" else None
    return get_scheduler(
        SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps, scheduler_specific_kwargs=extra,
    )  # fmt: skip


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per top-level module: (trainable, frozen) parameter counts, tied weights once."""
    counts: dict[str, list[int]] = {}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        row = counts.setdefault(_module_of(name), [0, 0])
        row[0 if param.requires_grad else 1] += weight_count(param)
    return {module: (t, f) for module, (t, f) in counts.items()}


def trainable_table(counts: dict[str, tuple[int, int]]) -> str:
    """`parameter_counts` as printed at start-up."""
    lines = [f"{'module':<12}{'trainable':>14}{'frozen':>14}"]
    lines += [f"{module:<12}{t:>14,}{f:>14,}" for module, (t, f) in counts.items()]
    total_t, total_f = (sum(col) for col in zip(*counts.values()))
    lines.append(f"{'total':<12}{total_t:>14,}{total_f:>14,}")
    return "\n".join(lines)
