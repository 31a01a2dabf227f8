"""`key=value` arguments of the `python -m vlm.*` commands, read as train.py's overrides are (values are YAML)."""

import torch
from omegaconf import DictConfig, OmegaConf


class UsageError(ValueError):
    pass


def parse_args(argv: list[str], known: set[str], required: set[str]) -> DictConfig:
    try:
        args = OmegaConf.from_cli(argv)
    except Exception as err:  # YAML errors of every kind: the message says which argument
        raise UsageError(f"cannot read the arguments ({err.__class__.__name__}: {str(err).splitlines()[0]}); "
                         "quote values with YAML characters, e.g. 'turns=[\"Is it red?\", \"yes\", \"Why?\"]'") from err  # fmt: skip
    if unknown := set(args) - known:
        raise UsageError(f"unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if missing := required - set(args):
        raise UsageError(f"missing {sorted(missing)}")
    return args


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when there is a GPU, else the CPU."""
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
