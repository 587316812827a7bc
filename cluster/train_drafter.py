"""``triserve train-drafter``: a self-distilled linear-spec drafter on Ray Train (see models.draft_training).

The driver builds the data once: prefixes cut from the training corpus (the same split as
``triserve train``: modules t-z held out), continued greedily by the base model through the serving
engine (batched, so thousands of continuations take minutes), saved under ``workdir/data``. The base
model decodes them in the dtype it serves in (``data_dtype``), so the targets are the tokens its
verifier accepts: a bf16 model's greedy text parts from an fp32 model's, and a drafter taught the fp32
text accepts fewer of the bf16 one's tokens. ``init_adapter`` continues training a saved drafter.
One Ray Train worker trains only the adapter (the base model is frozen), evaluates the greedy
accepted length on held-out continuations, checkpoints to ``workdir`` (resumable: adapter,
optimizer, step) and writes the adapter in PEFT's layout to ``output``, the folder ``models.load_model`` reads as
``MODEL/linear_spec_lora``; ``output`` holds nothing else.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cluster.self_distill import continue_greedily, cut_prefixes
from cluster.train import (
    batches_from,
    fit,
    learning_rate,
    resolve_paths,
    resume_state,
    save_checkpoint,
    settings_of_run,
)
from models.draft_training import DraftAdapter, draft_loss
from models.loading import load_adapter
from models.model import TriModeModel


@dataclass
class DrafterSettings:
    """Everything a run needs; saved beside the checkpoints so a resume uses the same settings."""

    model: str
    output: str
    workdir: str | None = None  # data, checkpoints, history (default: output + ".run")
    corpus: str | None = None
    resume: bool = False
    init_adapter: str | None = None  # a saved drafter (PEFT folder) to continue training from, same ranks
    rank: int = 128  # of o_proj's factors
    alpha: float = 128.0  # scale alpha / rank, shared by every projection
    mlp_rank: int = 32  # of the MLP's gate/up/down factors (0: o_proj only, like the official drafter)
    adapter_dtype: str = "bfloat16"  # of the saved factors (fp32 ones of this recipe would pass the 3 MB cap)
    data_dtype: str = "auto"  # the base model's dtype while it decodes the targets ("auto": the one it serves in)
    sequences: int = 3072  # self-distilled training continuations
    heldout_sequences: int = 64
    prefix_min: int = 80  # corpus tokens before the continuation starts (like a prompt)
    prefix_max: int = 96
    seq_len: int = 224  # prefix + greedy continuation
    blocks: str = "8,16,32"  # draft block lengths, one drawn per step
    decay: float = 0.85  # weight of the i-th draft token: decay ** i
    batch_size: int = 16
    steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0
    cpus_per_worker: float = 1.0
    threads: int = 2

    @property
    def block_lengths(self) -> list[int]:
        return [int(b) for b in self.blocks.split(",")]

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir or f"{self.output}.run")


# ----- data (driver side) -------------------------------------------------------------------------
def prepare_data(s: DrafterSettings) -> Path:
    """Self-distilled train and held-out continuations under ``workdir/data`` (reused when present)."""
    import models
    from models.data import corpus_files, default_corpus, pack_sequences

    data = s.run_dir / "data" / "continuations.pt"
    if data.is_file():
        return data
    dtype = None if s.data_dtype == "auto" else s.data_dtype
    model = models.load_model(s.model, dtype=dtype, adapter=False, warm_up=False)
    torch.set_num_threads(s.threads)
    train_files, heldout_files = corpus_files(Path(s.corpus) if s.corpus else default_corpus())
    gen = torch.Generator().manual_seed(s.seed)
    splits = {}
    for name, files, count in (("train", train_files, s.sequences), ("heldout", heldout_files, s.heldout_sequences)):
        rows = pack_sequences(files, model.tokenizer, s.seq_len)
        prefixes = cut_prefixes(rows, count, s.prefix_min, s.prefix_max, gen)
        splits[name] = continue_greedily(model, prefixes, s.seq_len, name)
    data.parent.mkdir(parents=True, exist_ok=True)
    torch.save(splits, data)
    return data


# ----- worker side ----------------------------------------------------------------------------
class DraftObjective(nn.Module):
    """The frozen model with the adapter attached and the draft loss as its ``forward``."""

    def __init__(self, model: TriModeModel, adapter: DraftAdapter, decay: float) -> None:
        super().__init__()
        self.model, self.adapter, self.decay = model, adapter, decay
        adapter.attach(model)

    def forward(self, sequences: torch.Tensor, cut: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        return draft_loss(self.model, sequences, cut, block, self.decay)


def draw_cut(s: DrafterSettings, block: int, gen: torch.Generator) -> int:
    """Where a step drafts: after the longest prefix, so every draft token is a greedy continuation."""
    return int(torch.randint(s.prefix_max, s.seq_len - block + 1, (1,), generator=gen))


@torch.no_grad()
def evaluate(objective: DraftObjective, heldout: torch.Tensor, s: DrafterSettings) -> dict[str, float]:
    """Mean greedy accepted length (draft tokens) per block length on held-out continuations, at fixed cuts."""
    metrics = {}
    gen = torch.Generator().manual_seed(4321)
    for block in s.block_lengths:
        lengths = [objective(heldout.long(), draw_cut(s, block, gen), block)[1].float() for _ in range(4)]
        metrics[f"eval_accepted@{block}"] = float(torch.cat(lengths).mean())
    return metrics


def train_loop(config: dict) -> None:
    import ray.train
    from tqdm import tqdm

    import models

    s = DrafterSettings(**config["settings"])
    data = torch.load(config["data"])
    train, heldout = data["train"], data["heldout"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(s.seed + rank)
    torch.set_num_threads(s.threads)
    model = models.load_model(s.model, dtype=torch.float32, adapter=False, tokenizer=False, warm_up=False)
    adapter = DraftAdapter(model, s.rank, s.alpha, seed=s.seed, mlp_rank=s.mlp_rank)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    start_step, history = 0, []
    state = resume_state(s.run_dir, s.resume, ray.train.get_checkpoint())
    if state is not None:
        adapter.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = state["step"], state["history"]
    elif s.init_adapter:
        load_adapter(model, Path(s.init_adapter))
        adapter.start_from(model)
    objective = DraftObjective(model, adapter, s.decay)
    gen = torch.Generator().manual_seed(s.seed * 1000 + rank + start_step)
    batches = batches_from(len(train), s, rank, world, start_step)
    bar = tqdm(total=s.steps, initial=start_step, desc="train-drafter", disable=rank != 0, mininterval=5)
    started = time.time() - (history[-1]["wall_s"] if history else 0.0)
    for step in range(start_step, s.steps):
        epoch, rows = next(batches)
        block = s.block_lengths[int(torch.randint(len(s.block_lengths), (1,), generator=gen))]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        loss, accepted = objective(train[rows].long(), draw_cut(s, block, gen), block)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), s.grad_clip)
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", accepted=f"{accepted.float().mean():.2f}")
        done = step + 1
        metrics = {"step": done, "epoch": epoch, "loss": loss.item(), "lr": learning_rate(step, s)}
        if rank == 0 and (done % s.eval_every == 0 or done == s.steps):
            metrics.update(evaluate(objective, heldout, s))
            metrics["wall_s"] = time.time() - started
            history.append(metrics)
            with open(s.run_dir / "history.jsonl", "a") as log:
                log.write(json.dumps(metrics) + "\n")
        if done % s.checkpoint_every == 0 or done == s.steps:
            save_checkpoint(adapter, optimizer, done, history, metrics, s.run_dir, rank)
    bar.close()
    if rank == 0:
        adapter.save(Path(s.output), base_model=Path(s.model).name, dtype=getattr(torch, s.adapter_dtype))


# ----- driver ---------------------------------------------------------------------------------
def run(settings: DrafterSettings) -> Path:
    """Prepare data, train on Ray Train, return the adapter folder."""
    from cluster.local import ensure_ray

    ensure_ray()
    resolve_paths(settings, "output", "model", "init_adapter", "corpus")
    run_dir = settings.run_dir.resolve()
    settings.workdir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = settings_of_run(settings, run_dir)
    fit(train_loop, settings, prepare_data(settings), run_dir)
    return Path(settings.output)
