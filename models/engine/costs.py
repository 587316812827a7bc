"""What a decoding option costs on this device: the numbers the router predicts latency from.

An *option* is a mode at a block length (``"ar"``, ``"linear_spec@32"``, ...). Per option the
engine keeps a lone request's step time, what each further request of the option adds to a step,
and its tokens per forward. ``triserve calibrate`` measures them (models/calibration.py) and the
replica loads them as priors; live traffic then refreshes them. A step counts only when every
request in it was decoding in one option (a prefill chunk or a neighbour in another option would
blur the figure); a request's tokens per forward counts when it finishes.

Step costs are refreshed for the whole device, not per option: every counted step of a calibrated
option joins a window of (calibrated prediction, requests, live seconds), and live = ``scale`` x
prediction + ``overhead`` x requests is fitted over it; every calibrated option's costs are reported
through it. Serving adds costs calibration does not see, and they slow every option alike:
neighbours compete for the CPU (a factor), and every step's output for each of its requests is
delivered, streamed and parsed by processes that share the machine (about the same time whatever
the step computed; on a 2-core Zen 4 EPYC, 1.0 ms on a 0.5 ms AR step and 0.5 ms on a 1.3 ms
linear_spec@8 one, for a lone request over HTTP). A factor alone made AR's cheap steps look three
times dearer to the router, and speculation, which takes fewer of them, as dear as AR; an overhead
per step rather than per request, learnt in a crowd, made a lone request's dearest options look
cheapest. Refreshing each option's cost on its own would instead leave the options traffic has not
visited lately looking cheaper than the ones it has, and the router would chase stale figures. While
the window's predictions per request do not spread enough to separate the two terms (a single option
at one batch size), or the fit gives no positive factor or a negative overhead, the overhead is 0
and the factor is the window's ratio of live to predicted seconds. An option without calibration
learns its lone step time from its own lone-request steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from models.modes import DecodeParams

DEFAULT_THRESHOLD = 0.9


def option_key(mode: str, block_length: int) -> str:
    """``"ar"`` (AR has no block) or ``"<mode>@<block>"``."""
    return "ar" if mode == "ar" else f"{mode}@{block_length}"


def split_option(key: str) -> tuple[str, int | None]:
    """The inverse of ``option_key``: (mode, block length or None for AR)."""
    mode, _, block = key.partition("@")
    return mode, int(block) if block else None


def request_option(params: DecodeParams, block_size: int) -> str | None:
    """The option a request's figures describe, or None when it departs from the option's defaults
    (a diffusion threshold other than 0.9, a set number of quadratic branches, an infilling window,
    revision): its TPF would mislead."""
    custom_threshold = params.mode == "diffusion" and params.threshold != DEFAULT_THRESHOLD
    if params.branches is not None or params.suffix or params.revise is not None or custom_threshold:
        return None
    return option_key(params.mode, params.block_length or block_size)


def may_speculate(limit: int | str | None, spec: OptionStats | None, ar: OptionStats | None, requests: int) -> bool:
    """The engine's crowd rule for a speculative request among ``requests`` (running and waiting,
    itself included; its own cycles are judged apart, ``record_pays``): a lone one is never demoted
    for a crowd; above ``limit`` none speculates ("auto": where ``spec``, the option's figures,
    predicts fewer tokens per second than ``ar``'s for that many requests; None: never). A step of n
    requests in an option costs ``step_s + per_request_s * (n - 1)`` and yields
    ``n * tpf`` tokens. Under "auto" an option that lacks a figure speculates: without calibration
    nothing is known to be lost by it."""
    if requests <= 1 or limit is None:
        return True
    if limit != "auto":
        return requests <= limit
    if spec is None or ar is None or None in (spec.tpf, spec.step_s, spec.per_request_s, ar.step_s, ar.per_request_s):
        return True
    return spec.step_cost(requests) / spec.tpf < ar.step_cost(requests)


OWN_MARGIN = 0.9  # a request's own cycles must promise this share of AR's tokens/s, or it takes AR steps


def record_pays(tpf: float, spec: OptionStats | None, ar: OptionStats | None, requests: int) -> bool:
    """Whether a speculative request whose own recent cycles yield ``tpf`` tokens per forward is
    predicted at least ``OWN_MARGIN`` of AR's tokens/s among ``requests`` requests, from the step costs
    of its option (``spec``) and of AR (True when a step cost is unknown: nothing is known to be lost).
    The margin keeps a request that is about even from flipping between the two on noise: in
    simulations of held-out greedy decodes (bench/RESULTS.md) it left requests whose drafts pay as fast
    as before and brought the fixture's linear_spec at block 32 from 0.69x to 0.95x AR."""
    if spec is None or ar is None or spec.step_s is None or ar.step_s is None:
        return True
    return tpf / spec.step_cost(requests) >= OWN_MARGIN / ar.step_cost(requests)


def effective_tpf(tokens: int, forwards: int, held: int, spec: OptionStats | None, ar: OptionStats | None) -> float:
    """A finished request's tokens per forward as the router reads the figure (tokens/s = TPF / the
    option's step time): its ``forwards`` include ``held`` AR steps taken while its own cycles did
    not pay, and each of those counts as the fraction of an option step that it costs (a whole one
    when a step cost is unknown)."""
    share = 1.0
    if held and spec is not None and ar is not None and spec.step_s and ar.step_s:
        share = ar.step_s / spec.step_s
    return tokens / (forwards - held + held * share)


@dataclass
class OptionStats:
    tpf: float | None = None  # tokens per forward of one request
    step_s: float | None = None  # a step carrying one request of this option
    per_request_s: float | None = None  # what each further request of the option adds to that step
    samples: int = 0  # live observations (steps, its requests' AR steps, finished requests) since start

    def to_dict(self) -> dict[str, float | int | None]:
        return {"tpf": self.tpf, "step_s": self.step_s, "per_request_s": self.per_request_s, "samples": self.samples}

    def step_cost(self, requests: int) -> float:
        """Seconds of a step carrying ``requests`` requests of this option (``step_s`` known; an unknown
        per-request cost counts as 0)."""
        return self.step_s + (self.per_request_s or 0.0) * (requests - 1)


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


SPREAD = 1.5  # the fit needs window steps whose predictions per request lie this many times apart
FIT_WINDOW = 64  # recent steps the device's cost fit is made over


class CostFit:
    """live seconds = ``scale`` x predicted + ``overhead`` x requests, least squares over the last
    ``size`` steps (predicted seconds, requests, live seconds). It is refitted on every decode step
    the engine times, so its sums are kept running (added as a step enters the window, taken off as it
    leaves) rather than summed over the window again; (ratio of sums, 0) where the steps' predictions
    per request do not spread by ``SPREAD`` (the two terms cannot be told apart) or the fit gives no
    positive scale or a negative overhead."""

    def __init__(self, size: int = FIT_WINDOW) -> None:
        self.size = size
        self.points: deque[tuple[float, int, float]] = deque()
        self.per_request: deque[float] = deque()  # each point's prediction per request
        self.sums = [0.0] * 7  # of x, y, x x, x r, r r, x y, r y

    def add(self, predicted: float, requests: int, seconds: float) -> None:
        if len(self.points) == self.size:
            self._sum(*self.points.popleft(), -1.0)
            self.per_request.popleft()
        self.points.append((predicted, requests, seconds))
        self.per_request.append(predicted / requests)
        self._sum(predicted, requests, seconds, 1.0)

    def _sum(self, x: float, r: int, y: float, sign: float) -> None:
        for i, term in enumerate((x, y, x * x, x * r, r * r, x * y, r * y)):
            self.sums[i] += sign * term

    def solve(self) -> tuple[float, float]:
        """(scale, overhead) over the window."""
        sx, sy, sxx, sxr, srr, sxy, sry = self.sums
        ratio = sy / sx if sx > 0 else 1.0
        if len(self.points) < 2 or max(self.per_request) < SPREAD * min(self.per_request):
            return ratio, 0.0
        det = sxx * srr - sxr * sxr
        scale, overhead = (sxy * srr - sry * sxr) / det, (sry * sxx - sxy * sxr) / det
        if scale <= 0 or overhead < 0:
            return ratio, 0.0
        return scale, overhead


class OptionCosts:
    """Per-option figures: calibrated priors through one live cost fit, TPFs refreshed per option.

    ``options`` holds what is observed per option (TPF, samples, and the lone step time of an
    uncalibrated option); a calibrated option's step costs are its priors through the fit (``scale``
    x prior + ``overhead``, for a step and for each further request), applied when they are read
    (``snapshot``)."""

    def __init__(self, priors: dict[str, OptionStats] | None = None, ema: float = 0.2) -> None:
        self.priors = {key: replace(stats, samples=0) for key, stats in (priors or {}).items()}
        self.options = {key: replace(stats) for key, stats in self.priors.items()}
        self.scale = 1.0  # live step time per second of calibrated prediction
        self.overhead = 0.0  # seconds serving adds to a step per request in it
        self.fit = CostFit()
        self.ema = ema

    def observe_step(self, key: str, requests: int, seconds: float) -> None:
        """A step whose ``requests`` requests all decoded in option ``key``, ``seconds`` from the end of
        the step before it (delivering that step's outputs included) to its own end."""
        stats = self.options.setdefault(key, OptionStats())
        prior = self.priors.get(key)
        if prior is not None and prior.step_s:
            self.fit.add(prior.step_cost(requests), requests, seconds)
            self.scale, self.overhead = self.fit.solve()
        elif requests == 1:
            stats.step_s = _ema(stats.step_s, seconds, self.ema)
        else:
            return
        stats.samples += 1

    def observe_demoted(self, key: str) -> None:
        """A step in which a request of option ``key`` took an AR step (in a crowd, or while its own
        cycles did not pay). The step's time is AR's, so no figure of the option changes, but its
        traffic was seen: the router gives exploration turns to the options with the fewest
        observations, and one whose requests mostly take AR steps would otherwise draw them all."""
        self.options.setdefault(key, OptionStats()).samples += 1

    def observe_finished(self, key: str, tpf: float) -> None:
        stats = self.options.setdefault(key, OptionStats())
        stats.tpf = _ema(stats.tpf, tpf, self.ema)
        stats.samples += 1

    def calibrated(self, key: str) -> bool:
        """Whether the option's step cost comes from calibration (``priors``), not live steps alone."""
        prior = self.priors.get(key)
        return prior is not None and prior.step_s is not None

    def figures(self, key: str) -> OptionStats | None:
        """An option's current figures, calibrated step costs through the live cost fit."""
        stats = self.options.get(key)
        prior = self.priors.get(key)
        if stats is not None and prior is not None and prior.step_s:
            per_request = prior.per_request_s and prior.per_request_s * self.scale + self.overhead
            stats = replace(stats, step_s=prior.step_s * self.scale + self.overhead, per_request_s=per_request)
        return stats

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """Every option's current figures (``figures``)."""
        return {key: self.figures(key).to_dict() for key in list(self.options)}


@dataclass
class StepCost:
    """Least-squares fit of step time = fixed + per_token * tokens over recent steps (any options)."""

    window: deque = field(default_factory=lambda: deque(maxlen=128))

    def add(self, tokens: int, seconds: float) -> None:
        self.window.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        window = list(self.window)  # one copy: the stepping thread may append meanwhile
        if len(window) < 4:
            return None
        n = len(window)
        sx = sum(t for t, _ in window)
        sy = sum(s for _, s in window)
        sxx = sum(t * t for t, _ in window)
        sxy = sum(t * s for t, s in window)
        var = n * sxx - sx * sx
        if var <= 0:  # every step had the same size: attribute it all to the fixed cost
            return sy / n, 0.0
        per_token = max((n * sxy - sx * sy) / var, 0.0)
        return max((sy - per_token * sx) / n, 0.0), per_token
