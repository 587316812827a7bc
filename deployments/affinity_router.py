"""The model deployments' Serve request router: prefix affinity (``deployments.affinity``).

A request marked with an affinity key goes to the replica that key hashes to (rendezvous hashing over
the live replicas, so a replica joining or leaving moves only its own share of keys), unless that
replica's queue is longer than the shortest known one by more than ``imbalance`` requests; then, as for
unmarked requests, Serve's own power-of-two-choices routing decides. A full replica rejects the request
as usual and the next rank (power of two choices) takes it.
"""

from __future__ import annotations

import hashlib
from typing import Any

# Serve's default router; Ray 2.60 exports only its mixins and base class (ray.serve.request_router)
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from deployments.affinity import AFFINITY_FIELD


def _request_key(pending: PendingRequest | None) -> str | None:
    if pending is None or not pending.args or not isinstance(pending.args[0], dict):
        return None
    return pending.args[0].get(AFFINITY_FIELD)


def _weight(key: str, replica: RunningReplica) -> bytes:
    return hashlib.blake2b(f"{key}/{replica.replica_id.unique_id}".encode(), digest_size=8).digest()


class PrefixAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Serve request router of a model deployment (``RequestRouterConfig``; kwargs: ``imbalance``)."""

    def initialize_state(self, imbalance: int, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self.imbalance = imbalance

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        default = await super().choose_replicas(candidate_replicas, pending_request)
        key = _request_key(pending_request)
        if key is None or len(candidate_replicas) < 2:
            return default
        owner = max(candidate_replicas, key=lambda replica: _weight(key, replica))
        cache = self.replica_queue_len_cache
        queues = [q for q in (cache.get(r.replica_id) for r in candidate_replicas) if q is not None]
        own = cache.get(owner.replica_id)
        if own is not None and own > min(queues) + self.imbalance:
            return default
        return [[owner], *default]
