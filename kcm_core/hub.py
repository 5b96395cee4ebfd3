"""The Hugging Face hub, asked once and briefly: is it switched off, and does a repository answer?

``models.load_model`` and ``data.load_text_data`` reach the hub only for a hub id the caller named,
and probe it here first, so a dead network or a mistyped id fails in seconds with one sentence
instead of after ``from_pretrained``'s long retry loops.
"""
from __future__ import annotations

import os

HUB_TIMEOUT_S = 5.0  # the reachability probe; a dead network fails in seconds, not after retries


def hub_offline() -> bool:
    """True when the user switched the hub off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def check_hub(repo_id: str, *, kind: str = "model", what: str | None = None,
              timeout: float = HUB_TIMEOUT_S) -> None:
    """Ask the hub about ``repo_id`` once, with a short timeout; raise one clear ``ValueError``.

    ``kind`` is ``"model"`` or ``"dataset"``; ``what`` names the action for the message. This probe
    replaces the long retry loops a plain ``from_pretrained`` runs into when the network is down.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    what = what or f"load {kind} {repo_id!r}"
    api = HfApi()
    probe = api.model_info if kind == "model" else api.dataset_info
    try:
        probe(repo_id, timeout=timeout)
    except GatedRepoError:
        raise ValueError(f"{kind} {repo_id!r} is gated on the Hugging Face hub; accept its terms and log "
                         "in (`hf auth login`), or pass a local folder") from None
    except RepositoryNotFoundError:
        raise ValueError(f"no {kind} {repo_id!r} on the Hugging Face hub (or it is private); check the "
                         "name or pass a local folder") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "an error")
        raise ValueError(f"the Hugging Face hub answered {status} when asked to {what}; try again later "
                         "or pass a local folder") from None
    except Exception as err:  # connection refused, DNS, timeout, proxy: all mean "unreachable"
        raise ValueError(f"could not reach the Hugging Face hub to {what} from this machine "
                         f"({type(err).__name__}); pass a local folder instead") from None
