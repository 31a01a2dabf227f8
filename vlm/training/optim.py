"""Optimizer and learning-rate schedule.

No weight decay on biases, norm weights and embeddings (decaying them hurts and buys nothing).
The schedule is linear warmup then cosine down to `lr * lr_min_ratio`, fitted to `max_steps`.
"""

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embedding_params else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    # foreach is the fast path on CPU and GPU; fused only exists for some device/dtype pairs.
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_ratio: float):
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps, min_lr_rate=min_ratio
    )
