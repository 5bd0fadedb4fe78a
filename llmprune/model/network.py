"""Is the Hugging Face Hub reachable? Decided once, quickly, through huggingface_hub's own settings.

Without a check, huggingface_hub retries a failed connection for ~45 s before transformers reports a missing model.

* Offline by configuration: ``huggingface_hub.constants.is_offline_mode()`` (``HF_HUB_OFFLINE`` /
  ``TRANSFORMERS_OFFLINE``, as the hub and transformers read them), or those variables set since it was imported
  (then the hub's setting is brought in line with them: what the user asked for).
* Otherwise one ``HEAD`` request to the configured endpoint (``HF_ENDPOINT``) through huggingface_hub's HTTP session,
  so proxies (``HTTPS_PROXY`` ...) and the hub's own client settings apply; any HTTP answer means reachable.

When the Hub is unreachable, the command line (:func:`allow_process_offline`, called by ``llmprune.cli``) switches
huggingface_hub to offline mode for its process, so cached files still load and missing ones fail at once. Used as a
library, llmprune never changes the process's Hub settings: :func:`hub_reachable` only answers (set
``HF_HUB_OFFLINE=1`` yourself to skip the retries).
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_process_wide = False


def allow_process_offline(enabled: bool = True) -> None:
    """Let :func:`hub_reachable` switch the whole process to offline mode when the Hub is unreachable (the CLI)."""
    global _process_wide
    _process_wide = enabled


def offline_configured() -> bool:
    """Offline by configuration: huggingface_hub's offline mode or the variables that set it."""
    from huggingface_hub import constants

    env = any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.is_offline_mode() or env)


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float) -> bool:
    """One HEAD request through huggingface_hub's session (proxies, headers and client settings of the hub)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)  # any status code: something answered
        return True
    except Exception as exc:  # noqa: BLE001 - connection, DNS, proxy, TLS and timeout errors all mean "no Hub"
        log.debug("Hub probe %s failed: %s: %s", endpoint, type(exc).__name__, exc)
        return False


def set_hub_offline() -> None:
    """Switch huggingface_hub (and datasets) to offline mode for this process."""
    import huggingface_hub.constants as hc

    hc.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub endpoint answers; False when offline by configuration or when it does not.

    An unreachable Hub switches the process to offline mode only when the CLI allowed it
    (:func:`allow_process_offline`).
    """
    if offline_configured():
        set_hub_offline()  # the variables may have been set after huggingface_hub read them: honour them
        return False
    from huggingface_hub import constants

    ok = _probe(constants.ENDPOINT, timeout)
    if not ok:
        log.info("Hugging Face Hub unreachable (%s); using locally cached files only", constants.ENDPOINT)
        if _process_wide:
            set_hub_offline()
    return ok
