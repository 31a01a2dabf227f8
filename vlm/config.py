"""Typed config sections: each component owns a dataclass; this file checks YAML against them.

Hydra already rejects unknown keys given on the command line; this catches typos inside YAML
files too (`train.lerning_rate: 1e-3` would otherwise be silently ignored).
"""

from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the Hydra configs of train.py (repository top)


class ConfigError(ValueError):
    pass


def typed_section(node: DictConfig, schema: type[T], key: str) -> T:
    """Validate `node` (the config at `key`) against the dataclass `schema` and return an instance."""
    try:
        # Resolve first: interpolations like ${model.vision.image_size} point outside this section.
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node, resolve=True))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"config section '{key}' does not fit {schema.__name__}: {err}. "
            "Check the key's spelling and type. See TROUBLESHOOTING.md#config-key-errors."
        ) from err
