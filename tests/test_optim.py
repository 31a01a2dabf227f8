"""Which parameters train and how: stages, per-module settings, regex overrides, schedules, the table.

Run: pytest tests/test_optim.py
"""

import pytest
from omegaconf import OmegaConf

from vlm.training.optim import (
    apply_trainable,
    build_optimizer,
    build_scheduler,
    param_settings,
    parameter_counts,
    trainable_table,
)
from vlm.training.train_config import TrainConfig


def optimizer_for(model, **train):
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), train))
    settings = param_settings(model, cfg)
    apply_trainable(model, settings)
    return build_optimizer(model, cfg, settings), cfg


def optimized_modules(optimizer) -> set[str]:
    return {g["name"].split("/")[0] for g in optimizer.param_groups}


@pytest.fixture
def model(tiny):
    yield tiny.model
    tiny.model.requires_grad_(True)  # the fixture is shared: leave everything trainable


@pytest.mark.parametrize(
    "stage, modules",
    [("align", {"projector"}), ("finetune", {"projector", "lm"}), ("full", {"vision", "projector", "lm"})],
)
def test_stages_choose_the_trainable_modules(model, stage, modules):
    optimizer, _ = optimizer_for(model, stage=stage)
    assert optimized_modules(optimizer) == modules
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        trains = name.split(".")[0] in modules
        assert param.requires_grad == trains and (id(param) in in_optimizer) == trains, name


def test_module_settings_and_overrides_set_lr_decay_and_freezing(model):
    optimizer, _ = optimizer_for(
        model, lr=1e-3, weight_decay=0.1,
        modules={"vision": {"lr_scale": 0.5, "weight_decay": 0.0}},
        param_overrides=[{"pattern": r"^lm\.model\.layers\.0\.", "trainable": False}, {"pattern": r"^projector\.", "lr_scale": 2.0}],
    )  # fmt: skip
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    embedding = model.lm.get_input_embeddings().weight
    for name, param in model.named_parameters():
        if name.startswith("lm.model.layers.0."):
            assert not param.requires_grad and id(param) not in by_param, name
            continue
        group = by_param[id(param)]
        expected_lr = {"vision": 5e-4, "projector": 2e-3}.get(name.split(".")[0], 1e-3)
        assert group["lr"] == pytest.approx(expected_lr), name
        decays = param.ndim >= 2 and param is not embedding and not name.startswith("vision.")
        assert group["weight_decay"] == (0.1 if decays else 0.0), name


def test_unknown_names_are_errors_that_name_the_key(model):
    with pytest.raises(ValueError, match="train.modules.*visoin"):
        optimizer_for(model, modules={"visoin": {"lr_scale": 2.0}})
    with pytest.raises(ValueError, match="train.param_overrides.*nothing_matches"):
        optimizer_for(model, param_overrides=[{"pattern": "nothing_matches"}])
    with pytest.raises(ValueError, match="train.stage='pretrain'"):
        optimizer_for(model, stage="pretrain")


@pytest.mark.parametrize(
    "schedule, expected",  # lr factor at steps 0, 5 (end of warmup), 10 (middle), 19
    [("constant", [0.0, 1.0, 1.0, 1.0]), ("linear", [0.0, 1.0, 10 / 15, 1 / 15]), ("cosine", [0.0, 1.0, None, None])],
)
def test_schedules_warm_up_then_decay_per_group(model, schedule, expected):
    optimizer, cfg = optimizer_for(
        model, lr=1e-3, warmup_steps=5, max_steps=20, schedule=schedule, modules={"vision": {"lr_scale": 0.1}}
    )
    scheduler = build_scheduler(optimizer, cfg)
    factors = []
    for step in range(20):
        factors.append([g["lr"] / g["initial_lr"] for g in optimizer.param_groups])
        optimizer.step(), scheduler.step()
    for step, factor in zip([0, 5, 10, 19], expected):
        assert len({round(f, 12) for f in factors[step]}) == 1  # every group on the same curve, own base lr
        if factor is not None:
            assert factors[step][0] == pytest.approx(factor)
    if schedule == "cosine":
        assert 0.1 < factors[19][0] < factors[10][0] < 1.0  # decays towards lr_min_ratio, not to zero


def test_trainable_table_counts_each_parameter_once(model):
    optimizer_for(model, stage="align")
    table = trainable_table(parameter_counts(model))
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    projector = sum(p.numel() for p in model.projector.parameters())
    assert lines["projector"] == [f"{projector:,}", "0"]
    assert lines["total"] == [f"{projector:,}", f"{total - projector:,}"]
