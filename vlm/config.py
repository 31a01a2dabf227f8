"""Typed config sections: each component owns a dataclass; this file checks YAML against them, and composes.

Hydra rejects unknown keys given on the command line, but suggests appending them (`+train.max_step=10`);
`check_overrides` names the key that was meant instead. `typed_section` catches typos inside YAML files too
(`train.lerning_rate: 1e-3` would otherwise be silently ignored), and keys left unset.
"""

import difflib
import re
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from vlm.errors import UserError, with_entry

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the Hydra configs of train.py (repository top)


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key (and links the entry that covers it, by default
    the one on config keys)."""

    def __init__(self, message: str):
        super().__init__(with_entry(message, "config-key-errors"))


def typed_section(node: DictConfig, schema: type[T], key: str) -> T:
    """Validate `node` (the config at `key`) against the dataclass `schema` and return an instance."""
    try:
        # Resolve first: interpolations like ${model.vision.image_size} point outside this section.
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node, resolve=True))
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as err:
        full_key = f"{key}.{err.full_key}"
        raise ConfigError(f"{full_key} is required and not set: add {full_key}=... to the command line") from err
    except ConfigKeyError as err:
        unknown = f"{key}.{err.full_key}" if err.full_key else key
        top_level = err.full_key and "." not in err.full_key  # nested sections: no suggestion
        meant = _closest(err.full_key, [f.name for f in fields(schema)]) if top_level else None
        hint = f"; did you mean {key}.{meant}?" if meant else ""
        raise ConfigError(f"config section '{key}' ({schema.__name__}) has no key {unknown}{hint}") from err
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"config section '{key}' does not fit {schema.__name__}: {err}. Check the key's spelling and type"
        ) from err


def compose_config(overrides: list[str]) -> DictConfig:
    """The run config of these command-line overrides, composed as train.py composes it (the tools' way in); a
    mistyped key is a ConfigError naming the key meant."""
    try:
        return _compose(overrides)
    except ConfigCompositionException as err:
        _name_the_key_meant(err, overrides)
        raise


def check_overrides(overrides: list[str]) -> None:
    """train.py's check before Hydra composes: a command-line key that does not exist is a ConfigError naming the
    closest key that does; any other composition problem is left to Hydra's own message."""
    try:
        _compose(overrides, hydra=True)
    except ConfigCompositionException as err:
        _name_the_key_meant(err, overrides)


def _name_the_key_meant(err: ConfigCompositionException, overrides: list[str]) -> None:
    """Raise a ConfigError for Hydra's "Could not override" of a key that does not exist; return otherwise."""
    found = re.match(r"Could not override '([\w.]+)'", str(err))
    if found is None or not isinstance(err.__cause__, (ConfigKeyError, ConfigAttributeError)):
        return
    key = found.group(1)
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key and not o.startswith("hydra.")]
    try:
        known = _dotted_keys(OmegaConf.to_container(_compose(rest), resolve=False))
    except ConfigCompositionException:
        known = []
    meant = _closest(key, known)
    hint = f"; did you mean {meant}?" if meant else ""
    raise ConfigError(
        f"{key} is not a config key{hint} (`+{key}=...` would add it, but only a section with free-form keys, "
        "such as model.vision.model_kwargs, takes one)"
    ) from err


def _compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    """`hydra`: with Hydra's own section, so `hydra.run.dir=...` and the like are checked too."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items() if isinstance(node, dict) else []:
        keys += [f"{prefix}{name}", *_dotted_keys(value, f"{prefix}{name}.")]
    return keys


def _closest(word: str, candidates: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None
