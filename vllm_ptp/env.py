"""VLLM_PTP_* environment settings that take one of a few named values."""

import os
from collections.abc import Sequence

ON_OFF = ("on", "off")


def env_choice(name: str, choices: Sequence[str], default: str) -> str:
    """`name`'s value in the environment, `default` when unset; a value not among `choices` is
    refused with an error that names them."""
    setting = os.environ.get(name, default)
    if setting not in choices:
        raise ValueError(f"{name}={setting!r} is not one of {tuple(choices)}")
    return setting
