"""The shapes dataset: deterministic, balanced, and train/validation never share a scene+question.

Run: pytest tests/test_shapes.py
"""

from collections import Counter

import numpy as np

from vlm.data.shapes import KINDS, ShapesConfig, ShapesVQA
from vlm.training.evaluation import majority_baseline


def test_same_seed_same_samples_other_seed_other_samples():
    a, b = ShapesVQA(ShapesConfig(seed=3), "train", 32), ShapesVQA(ShapesConfig(seed=3), "train", 32)
    c = ShapesVQA(ShapesConfig(seed=4), "train", 32)
    for i in (0, 7, 99):
        assert a[i]["messages"] == b[i]["messages"] and np.array_equal(a[i]["images"][0], b[i]["images"][0])
    assert any(a[i]["messages"] != c[i]["messages"] for i in range(10))


def test_splits_do_not_overlap():
    cfg = ShapesConfig(train_size=3000, val_size=300)
    train, val = ShapesVQA(cfg, "train", 32), ShapesVQA(cfg, "val", 32)
    train_keys = {train.scene(i).key() for i in range(len(train))}
    val_keys = {val.scene(i).key() for i in range(len(val))}
    assert len(val_keys) > 250  # validation is varied, not one scene repeated
    assert not train_keys & val_keys  # keys are the discrete scene + question, so pixel jitter cannot hide a repeat


def test_all_kinds_present_and_majority_baseline_low():
    val = ShapesVQA(ShapesConfig(val_size=1000), "val", 32)
    kinds = Counter(val[i]["kind"] for i in range(len(val)))
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 150
    assert majority_baseline(val) <= 0.20
