"""Fast Hub reachability check.

Without it, huggingface_hub retries a failed DNS lookup for ~45 s before
transformers reports a missing model. One short TCP probe decides; when the
Hub is unreachable, huggingface_hub is switched to offline mode so cached
files still load and missing ones fail at once.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")


def _env_offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def _probe(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def set_hub_offline() -> None:
    import huggingface_hub.constants as hc

    hc.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face Hub endpoint accepts a TCP connection.

    Returns False (and switches huggingface_hub to offline mode) when the
    environment says offline or the probe fails.
    """
    if _env_offline():
        set_hub_offline()
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    ok = _probe(url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80), timeout)
    if not ok:
        log.info("Hugging Face Hub unreachable; using locally cached files only")
        set_hub_offline()
    return ok
