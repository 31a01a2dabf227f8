"""Optimizer and learning-rate schedule.

No weight decay on biases, norm weights and embeddings (decaying them hurts and buys nothing).
The schedule is linear warmup then cosine down to `lr * lr_min_ratio`, fitted to `max_steps`.
"""

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, lr_scale: dict[str, float]) -> list[dict]:
    """One decay and one no-decay group per top-level module (vision, projector, lm), each with its lr.

    `lr_scale` multiplies the base lr per module. Measured on the shapes experiment: a from-scratch
    vision tower that learns only through the language loss needed a smaller one (x0.1) than the LM.
    """
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = name.split(".", 1)[0]
        decays = param.ndim >= 2 and id(param) not in embedding_params
        groups.setdefault((module, decays), []).append(param)
    unknown = set(lr_scale) - {module for module, _ in groups}
    if unknown:
        raise ValueError(f"train.lr_scale names modules the model does not have: {sorted(unknown)}")
    return [
        {
            "params": params,
            "lr": lr * lr_scale.get(module, 1.0),
            "weight_decay": weight_decay if decays else 0.0,
            "name": module if decays else f"{module}/no_decay",
        }
        for (module, decays), params in groups.items()
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], lr_scale: dict[str, float]
) -> torch.optim.Optimizer:
    # foreach is the fast path on CPU and GPU; fused only exists for some device/dtype pairs.
    return torch.optim.AdamW(parameter_groups(model, lr, weight_decay, lr_scale), lr=lr, betas=betas, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_ratio: float):
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps, min_lr_rate=min_ratio
    )
