"""The Hugging Face Hub, asked once and quickly: is it reachable, and is a model or dataset available without it.

An offline or firewalled machine should hear so in one line within seconds, naming what to do, instead of
after transformers' or datasets' retries (25-50 s measured here) and a traceback.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """Whether the user told the Hugging Face libraries to stay offline."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_FLAGS)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick HEAD request (proxies honoured): any HTTP answer means the Hub is reachable."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint()}/api/models", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def check_model_source(model: str, tokenizer: str | None = None) -> None:
    """A model (and tokenizer) that is neither a local directory nor in the Hugging Face cache needs the
    Hub: when the Hub cannot be reached, say so in one line, with what to do, before anything is written."""
    from huggingface_hub import try_to_load_from_cache

    for what, name in (("model", model), ("tokenizer", tokenizer)):
        if not name or Path(name).exists():
            continue
        try:
            cached = isinstance(try_to_load_from_cache(name, "config.json" if what == "model" else "tokenizer_config.json"),
                                str)
        except ValueError:  # not a valid repo id either
            raise ConfigError(f"{what} {name!r}: no such local directory, and not a Hugging Face Hub id") from None
        if not cached and (offline() or not hub_reachable()):
            raise ConfigError(f"{what} {name!r}: not a local directory and not in the Hugging Face cache, and the Hub "
                              f"cannot be reached ({'HF_HUB_OFFLINE is set' if offline() else endpoint() + ' unreachable'}):"
                              f" pass a local directory (--{what} DIR), or fetch it first where there is network: "
                              f"hf download {name}")
