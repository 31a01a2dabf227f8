"""Optimizer groups: every trainable parameter exactly once, per-module lr, no decay where it hurts.

Run: pytest tests/test_optim.py
"""

import pytest
from torch import nn

from vlm.training.optim import parameter_groups


def test_groups_cover_each_trainable_parameter_once_with_module_lr(tiny):
    model = tiny.model
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1, lr_scale={"vision": 0.5})
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        group = by_param[id(param)]
        assert group["lr"] == (5e-4 if name.startswith("vision.") else 1e-3), name
        no_decay = param.ndim < 2 or param is model.lm.get_input_embeddings().weight
        assert group["weight_decay"] == (0.0 if no_decay else 0.1), name


def test_unknown_module_in_lr_scale_is_an_error():
    with pytest.raises(ValueError, match="train.lr_scale.*visoin"):
        parameter_groups(nn.Sequential(nn.Linear(2, 2)), 1e-3, 0.0, {"visoin": 2.0})
