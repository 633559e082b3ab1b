"""Whether the Hugging Face hub can be reached, found out once per process and within seconds.

Why: with no network the hub clients retry every request with backoff (2 + 4 + 8 + 8 s), so an offline run
sat about 25 s in silence before it said that wikitext2 could not be reached. One short probe decides; when
it fails, the hub clients (huggingface_hub, transformers, datasets) are put in their offline mode for the
rest of the process: they read their caches and fail at once for what is not there.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0  # a reachable hub answers a HEAD in well under a second


def offline() -> str | None:
    """Why the hub is not to be asked ("HF_HUB_OFFLINE is set", or the probe of its endpoint failed: then the
    clients are switched offline), or None when it can be. Call it before anything that may go to the hub."""
    import huggingface_hub.constants as constants

    global _why
    if _why is None and not constants.HF_HUB_OFFLINE:
        failed = unreachable(constants.ENDPOINT)
        if failed is not None:
            _why = f"the Hugging Face hub does not answer ({failed})"
            go_offline(_why)
    return _why or ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None)


_why: str | None = None  # set once the probe has failed and the clients went offline


@functools.lru_cache(maxsize=8)
def unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``endpoint`` answers (any HTTP status: the network and the server are up), else why not.

    Through huggingface_hub's own HTTP session, so its proxy and certificate settings apply."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as exc:  # no DNS, refused, timed out, TLS failed (an HTTP error status raises nothing)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'no answer'}"
    return None


def go_offline(why: str) -> None:
    """The hub clients' offline mode for this process (and the processes it starts)."""
    import datasets.config
    import huggingface_hub.constants as constants

    log.debug("%s: models and datasets are read from the local cache only", why)
    constants.HF_HUB_OFFLINE = True  # huggingface_hub and transformers read it on every call
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
