"""Benchmark scores the field reads: lmms-eval (the harness papers use, an optional extra) run on our models.

`model.py` serves a model to lmms-eval through our one generation routine and chat format; `tasks.py` checks task
names, runs them, and writes lmms-eval's results files beside our summary. Both import lmms-eval, so code that
may run without it calls `require_lmms_eval` first and imports them after.
"""

import importlib.util

from vlm.config import ConfigError


def require_lmms_eval(key: str) -> None:
    """A clear error naming `key` (what asked for benchmarks) when the `bench` extra is not installed."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise ConfigError(
            f"{key} needs lmms-eval, which is not installed: pip install -e '.[bench]' (or `make test-bench`, which "
            "builds .venv-bench with it). See TROUBLESHOOTING.md#benchmarks-need-the-bench-extra."
        )


def lmms_eval_models():
    """lmms-eval's entry point (pyproject.toml): our model's manifest. A function, called by lmms-eval while its model
    registry is being built, so that nothing here imports lmms-eval's half-initialised `models` package."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlm", simple_class_path="vlm.harness.model.VlmModel")
