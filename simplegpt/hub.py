"""The Hugging Face hub as seen by simplegpt's downloads (hub models, hub datasets).

Offline, huggingface_hub retries each request for ~25 s and logs every retry; these helpers let a
command say in one line, at once, that the hub cannot be reached.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.parse
from typing import Iterator

OFFLINE_HINT = ("check the network, or set HF_HUB_OFFLINE=1 to use what is already in the local "
                "Hugging Face cache")


def offline_mode() -> bool:
    """True when the user asked the Hugging Face libraries to stay offline."""
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable() -> bool:
    """Whether the hub's host name resolves (fails fast where there is no network)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        try:
            from huggingface_hub import constants
        except ImportError:
            return True  # let the library that needs it report its absence
        endpoint = constants.ENDPOINT
    host = urllib.parse.urlparse(endpoint).hostname
    if not host:
        return True
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def quiet_hub_logs() -> Iterator[None]:
    """Silence huggingface_hub's per-retry warnings: the caller reports the failure once."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
