"""The ``triserve`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from models.modes import MODES


@contextmanager
def _loaded(args: argparse.Namespace) -> Iterator:
    """The model to decode with: loaded here, or rank 0 of a local tensor-parallel group."""
    import models

    if args.tensor_parallel_size > 1:
        from cluster.worker_group import local_group

        with local_group(args.model, args.tensor_parallel_size, dtype=args.dtype) as model:
            yield model
    else:
        yield models.load_model(args.model, dtype=args.dtype, int8_drafts=args.int8_drafts)


def _generate(args: argparse.Namespace) -> int:
    with _loaded(args) as model:
        return _generate_with(model, args)


def _generate_with(model, args: argparse.Namespace) -> int:
    import models

    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer files", file=sys.stderr)
        return 2
    prompt = model.tokenizer.encode(args.prompt)
    start = time.perf_counter()
    out = models.generate(
        model,
        prompt,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        block_length=args.block_length,
        threshold=args.threshold,
        max_steps=args.max_steps,
        branches=args.branches,
        temperature=args.temperature,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    print(model.tokenizer.decode(out.tokens, skip_special_tokens=True))
    print(
        f"[{args.mode}] tokens={len(out.tokens)} nfe={out.nfe} tpf={out.tpf:.2f} "
        f"tokens/s={len(out.tokens) / elapsed:.1f} finish={out.finish_reason}",
        file=sys.stderr if args.quiet_stats else sys.stdout,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cluster.local import ensure_ray
    from deployments.config import load_config

    config = load_config(args.config)
    stop = threading.Event()

    def on_signal() -> None:  # also while starting: Ray's own handler would abort the process instead
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    on_signal()
    # the workers are the work here: at Ray's default niceness (15) a served model's engine gave way to
    # every busy process at 0 (Ray's own, a client): 5-40% of the tokens/s of 16 concurrent requests (bench/RESULTS.md)
    ensure_ray(worker_niceness=0)
    on_signal()  # again: starting Ray installs its handlers
    from ray import serve

    from deployments.ingress import build_app

    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config), name="triserve", route_prefix="/", blocking=False)
    names = ", ".join(m.name for m in config.models)
    print(f"triserve: serving {names} on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    if os.environ.get("MAKELEVEL"):
        # under `make serve`: make passes SIGTERM on, but a make killed outright (SIGKILL) would
        # leave the server running with no one to stop it: its death is the signal
        parent = os.getppid()
        threading.Thread(target=_stop_when_orphaned, args=(parent, stop), daemon=True).start()
    stop.wait()
    _drain(config.shutdown_grace_s)
    print("triserve: shutting down", flush=True)
    serve.shutdown()
    import ray

    ray.shutdown()
    return 0


def _drain(grace_s: float) -> None:
    """Stop taking requests and let those in flight finish, for at most ``grace_s`` seconds."""
    from ray import serve

    ingress = serve.get_deployment_handle("ingress", app_name="triserve")
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            busy = ingress.drain.remote().result(timeout_s=5)
        except Exception as exc:  # no ingress to ask (gone, or never started): nothing to wait for
            print(f"triserve: could not drain the ingress ({exc})", flush=True)
            return
        if not busy:
            return
        print(f"triserve: waiting for {busy} request(s) in flight", flush=True)
        time.sleep(0.5)


def _stop_when_orphaned(parent: int, stop) -> None:
    while not stop.wait(0.5):
        if os.getppid() != parent:
            stop.set()


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    import models
    from models.calibration import calibrate, device_key, save_calibration
    from models.native_forward import drafts_in_int8

    torch.set_num_threads(args.threads)
    model = models.load_model(args.model, dtype=args.dtype, device=args.device, int8_drafts=args.int8_drafts)
    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer files", file=sys.stderr)
        return 2
    with torch.inference_mode():
        key = device_key(model.device, args.threads, model.dtype, drafts_in_int8(model))
    blocks = tuple(int(b) for b in args.blocks.split(","))
    print(f"calibrating {args.model} on {key}")
    print(f"{'option':<20} {'TPF':>6} {'step ms':>8} {'+ms/request':>12} {'lone tok/s':>11}")

    def show(option, stats):
        print(
            f"{option:<20} {stats.tpf:>6.2f} {stats.step_s * 1e3:>8.2f} {stats.per_request_s * 1e3:>12.3f} "
            f"{stats.tpf / stats.step_s:>11.1f}",
            flush=True,
        )

    options = calibrate(
        model,
        blocks=blocks,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        batch=args.batch,
        rounds=args.rounds,
        progress=show,
        cuda_graphs=not args.eager,
    )
    meta = {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batch": args.batch, "rounds": args.rounds}
    print(f"written to {save_calibration(args.model, key, options, **meta)}")
    return 0


def _add_calibrate_parser(sub) -> None:
    from models.calibration import DEFAULT_BLOCKS, PROMPTS

    cal = sub.add_parser(
        "calibrate",
        help="measure each mode's step cost and tokens per forward on this device for the router",
        description="Writes MODEL/triserve_calibration.json (one entry per device, threads, dtype and draft "
        "precision); replicas running the model with the same four load it as the router's priors.",
    )
    cal.add_argument("--model", required=True, help="checkpoint folder (official Hugging Face layout)")
    cal.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    cal.add_argument("--threads", type=int, default=1, help="CPU threads, as the replica uses (default: 1)")
    cal.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16, as the replica uses")
    cal.add_argument(
        "--int8-drafts", action="store_true", help="speculative drafts multiply in int8 (CPUs with AVX512-VNNI)"
    )
    cal.add_argument("--blocks", default=",".join(map(str, DEFAULT_BLOCKS)), help="block lengths to measure")
    cal.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"built-in prompts to use (1-{len(PROMPTS)})")
    cal.add_argument("--max-new-tokens", type=int, default=64)
    cal.add_argument("--batch", type=int, default=8, help="requests decoded at once for the per-request cost")
    cal.add_argument("--rounds", type=int, default=2, help="rounds the options take turns in (a drifting machine)")
    cal.add_argument(
        "--eager", action="store_true", help="on a GPU, measure without CUDA graphs (replicas with cuda_graphs: false)"
    )
    cal.set_defaults(func=_calibrate)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    names = {f.name for f in fields(args.settings)} - {"extra"}
    settings = args.settings(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    folder = args.run(settings)
    print(f"{args.what} written to {folder}")
    return 0


def _add_settings_parser(sub, name: str, settings, run, what: str, **texts) -> None:
    """A subcommand whose flags are the fields of the ``settings`` dataclass (a training recipe)."""
    from dataclasses import MISSING, fields

    parser = sub.add_parser(name, **texts)
    for f in fields(settings):
        if f.name in ("extra",):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None)
        elif f.default is MISSING:
            parser.add_argument(flag, required=True)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=f"default: {f.default}")
    parser.set_defaults(func=_train, settings=settings, run=run, what=what)


def _add_train_parsers(sub) -> None:
    from cluster import train, train_drafter

    _add_settings_parser(
        sub,
        "train",
        train.TrainSettings,
        train.run,
        "model",
        help="train a tri-mode model with the joint AR + diffusion objective on Ray Train",
        description="Corpus default: this interpreter's standard library (test suites excluded, t-z held out). "
        "--init-from takes a tri-mode checkpoint or a plain AR one (Mistral/Ministral/Llama tensor names).",
    )
    _add_settings_parser(
        sub,
        "train-drafter",
        train_drafter.DrafterSettings,
        train_drafter.run,
        "draft adapter",
        help="train a self-distilled linear-spec draft adapter (LoRA on o_proj and the MLP) for a model on Ray Train",
        description="Targets are the model's own greedy continuations of training-corpus prefixes; "
        "--output is the adapter folder (MODEL/linear_spec_lora to have the model load it).",
    )


def _train_vlm(args: argparse.Namespace) -> int:
    from cluster.train_vlm import run

    print(f"model written to {run(args)}")
    return 0


def _add_train_vlm_parser(sub) -> None:
    from cluster.train_vlm import add_arguments

    train_vlm = sub.add_parser(
        "train-vlm",
        help="train the tiny VLM on synthetic shapes with the joint AR + diffusion objective (one process)",
    )
    add_arguments(train_vlm)
    train_vlm.set_defaults(func=_train_vlm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triserve", description="Serve tri-mode diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="decode one prompt and print the text and decoding statistics")
    gen.add_argument("--model", required=True, help="checkpoint folder (official Hugging Face layout)")
    gen.add_argument("--mode", choices=MODES, default="ar")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--block-length", type=int, default=None, help="default: the checkpoint's block_size")
    gen.add_argument("--threshold", type=float, default=0.9, help="diffusion confidence threshold")
    gen.add_argument("--max-steps", type=int, default=None, help="diffusion: most denoise passes per block")
    gen.add_argument(
        "--branches", type=int, default=None, help="quadratic_spec: acceptance lengths drafted ahead per cycle"
    )
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: from config.json)")
    gen.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model over N ranks: a local Ray group, gloo on CPU (heads must divide by N)",
    )
    gen.add_argument(
        "--int8-drafts", action="store_true", help="speculative drafts multiply in int8 (CPUs with AVX512-VNNI)"
    )
    gen.add_argument("--quiet-stats", action="store_true", help="print the statistics line to stderr")
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="run the OpenAI-compatible Ray Serve app (starts a local Ray if needed)")
    srv.add_argument("--config", default=None, help="app YAML (default: deployments/configs/default.yaml)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1 keeps it local)")
    srv.set_defaults(func=_serve)

    _add_calibrate_parser(sub)
    _add_train_parsers(sub)
    _add_train_vlm_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
