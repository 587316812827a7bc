"""The serving engine core, Ray-free (in the spirit of vLLM v1; deployments/ wraps it in Ray Serve).

``scheduler`` (who runs, with how many tokens, who is preempted), ``kv_manager`` (pages on demand,
block table, prefix cache), ``runner`` (packed forward), ``sampler`` (batched post-processing,
one host copy per step), ``engine`` (the loop tying them), ``async_engine`` (an asyncio driver),
``detokenizer`` (text in O(new tokens)), ``costs`` (what each decoding option costs, for the router).
"""

from models.engine.async_engine import AsyncEngine
from models.engine.detokenizer import IncrementalDetokenizer
from models.engine.engine import Engine, EngineStats, RequestRejected, StepOutput
from models.engine.kv_manager import CacheFullError, KVCacheManager
from models.engine.scheduler import TIER_PRIORITY, Request

__all__ = [
    "TIER_PRIORITY",
    "AsyncEngine",
    "CacheFullError",
    "Engine",
    "EngineStats",
    "IncrementalDetokenizer",
    "KVCacheManager",
    "Request",
    "RequestRejected",
    "StepOutput",
]
