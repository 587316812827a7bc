"""One model's statistics aggregated over all its replicas, for the router.

A Serve deployment handle reaches one replica per call, so asking a replica for its own numbers
shows the router a sample, not the model. Every replica instead reports to a ``StatsBoard`` shared
by the deployment (a Serve deployment-scoped actor, deployments/server.py) a few times a second,
and a replica asked for stats answers with the board's aggregate. A replica that stops reporting
(dead, or being replaced) drops out after ``STALE_AFTER_S``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the board actor needs nothing of the engine
    from models.engine import EngineStats

STALE_AFTER_S = 5.0
SUMMED = ("running", "waiting", "used_pages", "pages", "prefix_cache_queries", "prefix_cache_hits", "preemptions")
OPTION_FIGURES = ("tpf", "step_s", "per_request_s")


def replica_stats(stats: EngineStats, max_step_tokens: int) -> dict[str, Any]:
    """One replica's report. Read from another thread than the one stepping the engine, without a
    lock: each figure is copied in one operation."""
    fit = stats.cost.fit()
    return {
        "running": stats.running,
        "waiting": stats.waiting,
        "used_pages": stats.pool_used_pages,
        "pages": stats.pool_pages,
        "batch_tokens": stats.batch_tokens,
        "options": stats.options.snapshot(),
        "fixed_step_s": fit[0] if fit else None,
        "per_token_s": fit[1] if fit else None,
        "max_step_tokens": max_step_tokens,
        "prefix_cache_queries": stats.prefix_queries,
        "prefix_cache_hits": stats.prefix_hits,
        "preemptions": stats.preemptions,
    }


def merge_stats(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The model as the router sees it: queue and batch sizes summed over replicas (``replicas``
    says how many to divide by), the step-cost fit averaged, per-option figures averaged with each
    replica weighted by its live observations of that option (plus one, so priors count)."""
    if not reports:
        raise ValueError("no replica reports")
    merged: dict[str, Any] = {"replicas": len(reports)}
    for name in SUMMED:
        merged[name] = sum(r.get(name) or 0 for r in reports)
    merged["pool_usage"] = merged["used_pages"] / merged["pages"] if merged["pages"] else 0.0
    for name in ("fixed_step_s", "per_token_s"):
        values = [r[name] for r in reports if r.get(name) is not None]
        merged[name] = sum(values) / len(values) if values else None
    merged["max_step_tokens"] = reports[0].get("max_step_tokens")
    options: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(k for r in reports for k in r.get("options", {})):
        entries = [r["options"][key] for r in reports if key in r.get("options", {})]
        option: dict[str, Any] = {"samples": sum(e.get("samples", 0) for e in entries)}
        for figure in OPTION_FIGURES:
            weighted = [(e[figure], e.get("samples", 0) + 1) for e in entries if e.get(figure) is not None]
            total = sum(w for _, w in weighted)
            option[figure] = sum(v * w for v, w in weighted) / total if weighted else None
        options[key] = option
    merged["options"] = options
    return merged


class StatsBoard:
    """The latest report of every live replica of one model deployment."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self.stale_after_s = stale_after_s
        self.reports: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, replica: str, stats: dict[str, Any]) -> None:
        self.reports[replica] = (time.monotonic(), stats)

    def aggregate(self, replica: str | None = None, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """The merged stats of the live replicas; a caller may hand in its own fresh report first."""
        if replica is not None and stats is not None:
            self.report(replica, stats)
        now = time.monotonic()
        for name in [n for n, (at, _) in self.reports.items() if now - at > self.stale_after_s]:
            del self.reports[name]
        return merge_stats([stats for _, stats in self.reports.values()])
