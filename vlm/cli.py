"""The `python -m vlm.*` commands: `key=value` arguments, read as train.py's overrides are (values are YAML), and
how a command ends: `--help` prints its usage, a user's mistake its message alone (vlm/errors.py)."""

import functools
import sys
from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from vlm.errors import UserError, report


class UsageError(ValueError):
    """Arguments the command cannot read: printed with the command's usage."""


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


def command(usage: str) -> Callable:
    """Decorates a command's `main(argv) -> exit status`: -h/--help prints `usage`; a UsageError prints itself and
    `usage` (status 2); a UserError prints its message alone (its own status; vlm/errors.py)."""

    def decorate(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        @functools.wraps(main)
        def run(argv: list[str]) -> int:
            if any(arg in ("-h", "--help") for arg in argv):
                print(usage)
                return 0
            try:
                return main(argv)
            except UsageError as err:
                print(f"{err}\n\n{usage}", file=sys.stderr)
                return 2
            except UserError as err:
                return report(err)

        return run

    return decorate
