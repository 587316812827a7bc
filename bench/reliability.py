"""Reliability figures of the served app: fuzzed and hostile requests, a disconnect storm, a burst
beyond the queue limits, a replica killed under load, a soak; with ``--parts rankkill``, a
tensor-parallel rank killed under load. Only 127.0.0.1; bounded in time.

    python bench/reliability.py [--fuzz 2000] [--storm 500] [--burst 1000] [--kill-s 60] [--soak-min 10] [--long]

Starts the default app (deployments/configs/default.yaml: tiny and tiny-vlm) in a local Ray and prints
one table row per part. The test suite runs the fuzz, hostile and storm parts in a reduced size
against its own app (tests/test_reliability.py), the rank kill in a reduced size
(tests/test_tensor_parallel_cluster.py) and a burst at a small queue (tests/test_serve_http.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import time
import zlib
from dataclasses import dataclass, field

import httpx

HANG_S = 30.0  # no answer within this: a hang
DEADLINE_S = 20.0  # the requests' own deadline (``timeout``): slow work is answered with a 408 before HANG_S
DEEP = 5000

# request bodies no client should send; each must get a 4xx (for chat, "prompt" becomes "messages")
HOSTILE: dict[str, str | bytes] = {
    "deep prompt": '{"model": "tiny", "prompt": ' + "[" * DEEP + "]" * DEEP + "}",
    "deep extra field": '{"model": "tiny", "prompt": "x", "metadata": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
    "malformed": '{"model": "tiny", "prompt": "x"',
    "invalid utf-8": b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}',
    "NaN": '{"model": "tiny", "prompt": "x", "temperature": NaN}',
    "Infinity": '{"model": "tiny", "prompt": "x", "max_tokens": Infinity}',
    "not an object": "[1, 2, 3]",
    "negative max_tokens": '{"model": "tiny", "prompt": "x", "max_tokens": -1}',
    "enormous max_tokens": '{"model": "tiny", "prompt": "x", "max_tokens": 1000000000000}',
    "enormous n": '{"model": "tiny", "prompt": "x", "n": 1000000000}',
    "prompt of the wrong type": '{"model": "tiny", "prompt": {"a": 1}}',
    "huge token id": '{"model": "tiny", "prompt": [99999999999999999999]}',
}


def _image_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def hostile_images() -> dict[str, str]:
    """Image parts that lie or explode: (name, data URL)."""
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("L", (20000, 20000)).save(bomb, format="PNG")  # 400 Mpixel, a few hundred kB encoded
    return {
        "decompression bomb": _image_url(bomb.getvalue()),
        "text posing as png": _image_url(b"definitely not a picture"),
        "truncated png": _image_url(bomb.getvalue()[:200]),
        "empty": _image_url(b""),
        "not base64": "data:image/png;base64,@@@@",
    }


@dataclass
class Tally:
    """Outcomes of a part: answers by status class, hangs and broken connections."""

    sent: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    hangs: int = 0
    broken: int = 0
    failures: list[str] = field(default_factory=list)  # a few examples of what went wrong

    def answer(self, status: int, what: str) -> None:
        self.sent += 1
        key = f"{status // 100}xx"
        self.by_class[key] = self.by_class.get(key, 0) + 1
        if status >= 500 and len(self.failures) < 5:
            self.failures.append(f"{status} {what}")

    def error(self, exc: Exception, what: str) -> None:
        self.sent += 1
        if isinstance(exc, httpx.TimeoutException):
            self.hangs += 1
        else:
            self.broken += 1
        if len(self.failures) < 5:
            self.failures.append(f"{type(exc).__name__} {what}")

    @property
    def server_errors(self) -> int:
        return self.by_class.get("5xx", 0)


def hostile_body(name: str, path: str) -> str | bytes:
    """HOSTILE[name] as sent to ``path`` (a chat request has messages where completions have a prompt)."""
    body = HOSTILE[name]
    if path.endswith("chat/completions") and isinstance(body, str):
        body = body.replace('"prompt"', '"messages"')
    return body


def image_request(model: str, url: str) -> dict:
    """A chat request asking ``model`` about the image at ``url``."""
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}


def hostile(base: str, headers: dict[str, str]) -> Tally:
    tally = Tally()
    with httpx.Client(timeout=HANG_S, headers={**headers, "content-type": "application/json"}) as client:
        for path in ("/v1/completions", "/v1/chat/completions"):
            for name in HOSTILE:
                _send(tally, name, client.post, f"{base}{path}", content=hostile_body(name, path))
        for name, url in hostile_images().items():
            _send(tally, name, client.post, f"{base}/v1/chat/completions", json=image_request("tiny-vlm", url))
        huge = json.dumps({"model": "tiny", "prompt": "def f():\n    pass\n" * 600_000})  # 10 MB
        _send(tally, "10 MB prompt", client.post, f"{base}/v1/completions", content=huge)
    return tally


def _send(tally: Tally, what: str, call, *args, **kwargs) -> None:
    try:
        tally.answer(call(*args, **kwargs).status_code, what)
    except httpx.HTTPError as exc:
        tally.error(exc, what)


def fuzz(base: str, headers: dict[str, str], examples: int, seed: int = 0) -> Tally:
    """schemathesis against /openapi.json: ``examples`` generated requests spread over the operations,
    schema-valid and schema-violating ones."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    served = [m["id"] for m in httpx.get(f"{base}/v1/models", headers=headers, timeout=HANG_S).json()["data"]]
    tally = Tally()
    with_body = [op for op in operations if op.body]
    for operation in operations:
        per_operation = max(examples // len(with_body), 1) if operation.body else 10
        strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE) | operation.as_strategy(
            generation_mode=schemathesis.GenerationMode.NEGATIVE
        )

        @hypothesis.settings(
            max_examples=per_operation,
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.seed(seed)
        @hypothesis.given(strategy)
        def call(case) -> None:
            what = f"{case.operation.method.upper()} {case.operation.path}"
            body = case.body
            if isinstance(body, dict) and "model" in body and zlib.crc32(repr(body).encode()) % 2:
                body["model"] = served[0]  # past the 404 for an unknown model, for about half of them
                body.setdefault("timeout", DEADLINE_S)
            try:
                response = case.call(base_url=base, headers=headers, timeout=HANG_S)
            except Exception as exc:  # requests' own errors: a hang (timeout) or a broken connection
                tally.error(httpx.TimeoutException(str(exc)) if "timed out" in str(exc).lower() else exc, what)
                return
            tally.answer(response.status_code, what)

        call()
    return tally


async def storm(base: str, headers: dict[str, str], count: int, concurrency: int = 32, seed: int = 0) -> Tally:
    """``count`` streamed requests (mixed modes), each dropped after a random number of chunks."""
    rng = random.Random(seed)
    modes = ["ar", "diffusion", "linear_spec", "quadratic_spec"]
    tally = Tally()
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": "tiny",
            "prompt": f"def task_{i}(x):\n",
            "max_tokens": 64,
            "stream": True,
            "decoding": {"mode": modes[i % len(modes)]},
        }
        keep = rng.randint(0, 8)
        async with gate:
            try:
                async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
                    tally.answer(response.status_code, "storm")
                    seen = 0
                    async for line in response.aiter_lines():
                        seen += line.startswith("data: ")
                        if seen > keep:
                            break  # leaving the block drops the connection mid-stream
            except httpx.HTTPError as exc:
                tally.error(exc, "storm")

    async with httpx.AsyncClient(timeout=HANG_S, headers=headers) as client:
        await asyncio.gather(*(one(client, i) for i in range(count)))
    return tally


@dataclass
class Overload:
    """A burst's outcomes: answers, clean 429s, anything else; the most requests a replica queued."""

    ok: int = 0
    rejected: int = 0  # 429 with Retry-After and a rate_limit_error body
    other: list[str] = field(default_factory=list)
    hangs: int = 0
    peak_waiting: int = 0  # the most requests the model's replicas held waiting, summed
    peak_replicas: int = 0


def stats_board(model: str):
    """The model deployment's statistics board: every replica's report, read without going through the
    (saturated) replicas."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    board = next(a for a in named if a["name"].startswith(f"SERVE_DEPLOYMENT_ACTOR::triserve::model-{model}::"))
    return ray.get_actor(board["name"], namespace=board["namespace"])


async def overload(
    base: str, headers: dict[str, str], count: int, model: str = "tiny", deadline_s: float = 120.0
) -> Overload:
    """``count`` requests at once (far beyond what ``model`` runs and queues): each must be answered
    or refused with a 429; meanwhile the replicas' waiting queues are sampled. The admitted ones wait
    their turn (up to ``deadline_s``, their own deadline): a queue is not a hang."""
    board = stats_board(model)
    result = Overload()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            stats = await board.aggregate.remote()
            result.peak_waiting = max(result.peak_waiting, stats["waiting"])
            result.peak_replicas = max(result.peak_replicas, stats["replicas"])
            await asyncio.sleep(0.1)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": model, "prompt": f"def burst_{i}(x):\n", "max_tokens": 16, "timeout": deadline_s}
        try:
            r = await client.post(f"{base}/v1/completions", json=body)
        except httpx.TimeoutException:
            result.hangs += 1
            return
        except httpx.HTTPError as exc:
            result.other.append(type(exc).__name__)
            return
        if r.status_code == 200:
            result.ok += 1
        elif r.status_code == 429 and "retry-after" in r.headers and r.json()["error"]["type"] == "rate_limit_error":
            result.rejected += 1
        else:
            result.other.append(f"{r.status_code} {r.text[:120]}")

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=deadline_s + HANG_S, headers=headers, limits=limits) as client:
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(one(client, i) for i in range(count)))
        done.set()
        await sampler
    return result


def engine_idle(model: str = "tiny", within_s: float = 30.0) -> dict:
    """The model's engines once nothing runs there (waits up to ``within_s``): its merged statistics."""
    from ray import serve

    handle = serve.get_deployment_handle(f"model-{model}", app_name="triserve")
    deadline = time.monotonic() + within_s
    while True:
        stats = handle.stats.remote().result()
        if (stats["running"] == 0 and stats["used_pages"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


# ----- under load: replica kill and soak --------------------------------------------------------------
@dataclass
class Load:
    ok: int = 0
    retryable: int = 0  # 503/429 with Retry-After, 408 past the deadline, or a stream ended by an error event
    other: list[str] = field(default_factory=list)
    hangs: int = 0
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (finished at, seconds)


async def load(base: str, headers: dict[str, str], clients: int, seconds: float, images: bool, seed: int = 0) -> Load:
    """``clients`` clients sending mixed requests (modes, tiers, streams, images) back to back."""
    rng = random.Random(seed)
    modes = ["auto", "ar", "diffusion", "linear_spec", "quadratic_spec"]
    tiers = ["interactive", "standard", "batch"]
    picture = _picture() if images else None
    result = Load()
    stop = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        while time.monotonic() < stop:
            stream = rng.random() < 0.5
            body: dict = {
                "max_tokens": rng.randint(4, 48),
                "stream": stream,
                "service_tier": rng.choice(tiers),
                "timeout": DEADLINE_S,
            }
            if picture and rng.random() < 0.15:
                content = [
                    {"type": "text", "text": "Describe it."},
                    {"type": "image_url", "image_url": {"url": picture}},
                ]
                body.update(model="tiny-vlm", messages=[{"role": "user", "content": content}])
                body["max_tokens"] = rng.randint(2, 12)  # the VLM's context is 32 tokens, the picture takes 16
                path = "/v1/chat/completions"
            else:
                body.update(model="tiny", prompt=f"def f_{c}_{rng.randint(0, 999)}(x):\n")
                body["decoding"] = {"mode": rng.choice(modes)}
                path = "/v1/completions"
            start = time.monotonic()
            try:
                outcome = await _request(client, f"{base}{path}", body, stream)
            except httpx.TimeoutException:
                result.hangs += 1
                continue
            except httpx.HTTPError as exc:
                result.other.append(type(exc).__name__)
                continue
            now = time.monotonic()
            if outcome == "ok":
                result.ok += 1
                result.latencies.append((now, now - start))
            elif outcome == "retryable":
                result.retryable += 1
                await asyncio.sleep(0.2)
            else:
                result.other.append(outcome)

    async with httpx.AsyncClient(timeout=HANG_S, headers=headers) as client:
        await asyncio.gather(*(client_loop(client, c) for c in range(clients)))
    return result


async def _request(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> str:
    """ "ok", "retryable" or a description of another outcome."""
    if not stream:
        r = await client.post(url, json=body)
        if r.status_code == 200:
            return "ok"
        if r.status_code == 408 or r.status_code in (429, 503) and "retry-after" in r.headers:
            return "retryable"
        return f"{r.status_code} {r.text[:120]}"
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            retry = r.status_code == 408 or r.status_code in (429, 503) and "retry-after" in r.headers
            return "retryable" if retry else f"{r.status_code} {r.text[:120]}"
        last = ""
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                if '"error"' in line:
                    return "retryable"
                last = line
        return "ok" if last == "data: [DONE]" else "stream ended without [DONE]"


def _picture() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    return _image_url(buffer.getvalue())


def replica_pids(deployment: str) -> list[int]:
    """Processes of a deployment's live Serve replicas (Ray titles them ray::ServeReplica:<app>:<name>)."""
    import psutil

    title = f"ServeReplica:triserve:{deployment}"
    return [p.pid for p in psutil.process_iter(["cmdline"]) if any(title in part for part in p.info["cmdline"] or ())]


def kill_replica(deployment: str) -> None:
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    replica = next(a for a in names if a["name"].startswith(f"SERVE_REPLICA::triserve#{deployment}#"))
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)


def kill_rank() -> None:
    """SIGKILL to a tensor-parallel rank actor's process (rank 1 of the tiny model's group)."""
    import psutil

    ranks = [
        p for p in psutil.process_iter(["cmdline"]) if any("RankActor" in part for part in p.info["cmdline"] or ())
    ]
    ranks[0].kill()


async def under_kill(
    base: str, headers: dict[str, str], seconds: float, kill, clients: int = 32
) -> tuple[Load, float | None]:
    """``clients`` clients for ``seconds``; a third of the way in ``kill()`` runs (a replica or a rank
    dies). Returns the load's outcomes and the seconds from the kill until a request succeeds again."""
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(load(base, headers, clients, seconds, images=False, seed=1))
    await asyncio.sleep(seconds / 3)
    killed = time.monotonic()
    await loop.run_in_executor(None, kill)
    recovered = None
    async with httpx.AsyncClient(timeout=HANG_S, headers=headers) as client:
        while recovered is None and time.monotonic() - killed < seconds:
            try:  # a probe may time out or lose its connection while the replica is replaced: not yet
                r = await client.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
                if r.status_code == 200:
                    recovered = time.monotonic() - killed
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    return await task, recovered


def rss_mb(pids: list[int]) -> float:
    import psutil

    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


def soak(base: str, headers: dict[str, str], minutes: float) -> tuple[Load, float, float, dict]:
    """The load for ``minutes``; replica RSS once its first minute is over (caches and allocator
    pools have grown to their working size by then) and at the end."""
    pids = replica_pids("model-tiny") + replica_pids("model-tiny-vlm")

    async def run() -> tuple[Load, float]:
        task = asyncio.create_task(load(base, headers, 32, minutes * 60, images=True, seed=2))
        await asyncio.sleep(min(60.0, minutes * 60 / 2))
        return await task, rss_mb(pids)

    result, start_rss = asyncio.run(run())
    return result, start_rss, rss_mb(pids), engine_idle()


def per_minute(latencies: list[tuple[float, float]]) -> list[tuple[int, int, float, float]]:
    """(minute, requests, p50 s, p99 s)."""
    if not latencies:
        return []
    first = min(t for t, _ in latencies)
    minutes: dict[int, list[float]] = {}
    for t, seconds in latencies:
        minutes.setdefault(int((t - first) // 60), []).append(seconds)
    rows = []
    for minute in sorted(minutes):
        values = sorted(minutes[minute])
        rows.append(
            (minute, len(values), statistics.median(values), values[min(len(values) - 1, int(0.99 * len(values)))])
        )
    return rows


# ----- the run ----------------------------------------------------------------------------------------
def start_app(tensor_parallel: bool = False) -> str:
    """The default app, or (``tensor_parallel``) cluster/serve-cpu.yaml's: the tiny model on a TP=2 group."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["TRISERVE_API_KEY"] = ""
    from ray import serve

    from cluster.local import ensure_ray, wait_until_healthy
    from deployments.config import load_config
    from deployments.ingress import build_app

    ensure_ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    if tensor_parallel:
        import yaml

        from deployments.config import REPO, parse_config

        raw = yaml.safe_load((REPO / "cluster" / "serve-cpu.yaml").read_text())["applications"][0]["args"]["config"]
        config = parse_config(raw, base=REPO)
    else:
        config = load_config()
    serve.run(build_app(config), name="triserve", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base, 300)
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz", type=int, default=2000, help="generated requests")
    parser.add_argument("--storm", type=int, default=500, help="streams dropped mid-way")
    parser.add_argument("--kill-s", type=float, default=60.0, help="seconds of load around the replica kill")
    parser.add_argument("--burst", type=int, default=1000, help="requests sent at once (overload)")
    parser.add_argument("--soak-min", type=float, default=10.0)
    parser.add_argument("--long", action="store_true", help="a 30-minute soak")
    parser.add_argument(
        "--parts", default="hostile,fuzz,storm,overload,kill,soak", help="which parts, comma-separated; rankkill alone"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts == {"rankkill"}:  # its own app: the tiny model on a TP=2 group
        base = start_app(tensor_parallel=True)
        killed, recovered = asyncio.run(under_kill(base, {}, args.kill_s, kill_rank))
        report("rank kill (TP=2)", args.kill_s, killed, recovered)
        return
    base, headers = start_app(), {}
    print(f"app at {base}; {os.cpu_count()} CPUs")
    print("| part | requests | 2xx | 4xx | 5xx | hangs | broken | notes |")
    print("|---|---|---|---|---|---|---|---|")

    def row(part: str, tally: Tally, notes: str = "") -> None:
        c = tally.by_class
        print(
            f"| {part} | {tally.sent} | {c.get('2xx', 0)} | {c.get('4xx', 0)} | {tally.server_errors} | "
            f"{tally.hangs} | {tally.broken} | {notes or '; '.join(tally.failures)} |",
            flush=True,
        )

    if "hostile" in parts:
        row("hostile", hostile(base, headers))
    if "fuzz" in parts:
        row("fuzz (schemathesis)", fuzz(base, headers, args.fuzz))
    if "storm" in parts:
        tally = asyncio.run(storm(base, headers, args.storm))
        idle = engine_idle()
        row("disconnect storm", tally, f"after: running {idle['running']}, pages in use {idle['used_pages']}")
    if "overload" in parts:
        from deployments.config import load_config

        burst = asyncio.run(overload(base, headers, args.burst))
        idle = engine_idle()
        limit = load_config().models[0].max_waiting
        print(
            f"\noverload ({args.burst} requests at once): {burst.ok} answered, {burst.rejected} 429 with Retry-After, "
            f"{len(burst.other)} other ({'; '.join(burst.other[:3])}), {burst.hangs} hangs; most waiting "
            f"{burst.peak_waiting} over {burst.peak_replicas} replica(s) (max_waiting {limit} per replica); after: "
            f"running {idle['running']}, pages in use {idle['used_pages']}",
            flush=True,
        )
    if "soak" in parts:  # before the kill: a replica that was just rebuilt has not warmed up
        minutes = 30.0 if args.long else args.soak_min
        result, start_rss, end_rss, idle = soak(base, headers, minutes)
        print(f"\nsoak ({minutes:.0f} min, 32 clients, mixed modes, tiers, images)")
        print("| minute | requests | p50 s | p99 s |")
        print("|---|---|---|---|")
        for minute, count, p50, p99 in per_minute(result.latencies):
            print(f"| {minute} | {count} | {p50:.2f} | {p99:.2f} |")
        growth = (end_rss / start_rss - 1) * 100 if start_rss else float("nan")
        print(
            f"errors: {len(result.other)} other ({'; '.join(result.other[:3])}), {result.retryable} retryable, "
            f"{result.hangs} hangs; replica RSS after the first minute {start_rss:.0f} MiB, at the end "
            f"{end_rss:.0f} MiB ({growth:+.1f}%); at the end: running {idle['running']}, pages in use "
            f"{idle['used_pages']}",
            flush=True,
        )
    if "kill" not in parts:
        return
    killed, recovered = asyncio.run(under_kill(base, headers, args.kill_s, lambda: kill_replica("model-tiny")))
    report("replica kill", args.kill_s, killed, recovered)


def report(part: str, seconds: float, killed: Load, recovered: float | None) -> None:
    again = f"serving again {recovered:.1f} s after the kill" if recovered is not None else "NOT serving again"
    print(
        f"\n{part} ({seconds:.0f} s, 32 clients): {killed.ok} ok, {killed.retryable} clean errors, "
        f"{len(killed.other)} other ({'; '.join(killed.other[:3])}), {killed.hangs} hangs; {again}",
        flush=True,
    )


if __name__ == "__main__":
    main()
