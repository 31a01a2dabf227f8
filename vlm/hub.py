"""Pretrained parts by hub name or local path: a failure names the config key, the name and what to do.

transformers and timm raise OSError for everything from "no network" to "no such directory" (and spend
about 45 s retrying when the network is down); the user needs to know which setting was being loaded and
how to run offline, not a stack of HTTP retries.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlm.config import ConfigError


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


@contextmanager
def loading(key: str, name: str) -> Iterator[None]:
    """Turn a failed `from_pretrained` / `create_model(pretrained=True)` of `name` (set by `key`) into a
    ConfigError naming both and the TROUBLESHOOTING entry."""
    try:
        yield
    except OSError as err:
        if looks_like_path(name) and not Path(name).expanduser().exists():
            raise ConfigError(f"{key}={name!r}: no such file or directory. "
                              "See TROUBLESHOOTING.md#a-hub-name-with-no-network.") from err  # fmt: skip
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{key}={name!r} could not be loaded ({first_line}). Offline: download it once where there is a "
            "network and set HF_HUB_OFFLINE=1, or give a local directory or file; for random weights at the same "
            "architecture set it to null/false. See TROUBLESHOOTING.md#a-hub-name-with-no-network."
        ) from err
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ConfigError(
            f"{key}={name!r} needs code from its repository to load: it runs only with {key.rsplit('.', 1)[0]}."
            "trust_remote_code=true, after you have read that code. See TROUBLESHOOTING.md#trust_remote_code."
        ) from err
