"""Prefix affinity keys: a model's requests whose prompts begin with the same pages should run on the
same replica, where that replica's prefix cache holds the pages they share — the ``n`` / ``best_of``
sequences of one request, infilling's candidate middle lengths, prompts behind one long system prompt.
The ingress marks each engine request with its key; ``deployments.affinity_router`` routes by it.
Ray-free, like the OpenAI layer that uses it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

AFFINITY_FIELD = "affinity"
# pages of the prompt's start that make its key (64 tokens at the default page size): prompts behind a common
# system prompt at least that long share a key whatever follows it; shorter ones differ by what follows
AFFINITY_PAGES = 4


def affinity_key(prompt: Sequence[int], page_size: int, pages: int = AFFINITY_PAGES) -> str | None:
    """Digest of the prompt's leading full pages (at most ``pages``), or None when the prefix cache
    could share none of it (a prompt's last token is always computed, so its page must be followed by one)."""
    full = min((len(prompt) - 1) // page_size, pages) * page_size if prompt else 0
    if full <= 0:
        return None
    return hashlib.blake2b(repr(list(prompt[:full])).encode(), digest_size=16).hexdigest()
