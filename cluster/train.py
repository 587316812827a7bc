"""``triserve train``: the family's joint AR + diffusion recipe on Ray Train (TorchTrainer, DDP).

The driver prepares data once (corpus, tokenizer, packed sequences) and hands file paths to the
workers; each worker trains with DDP (gloo on CPU, NCCL on GPUs), rank 0 evaluates on held-out
modules, checkpoints (resumable: model, optimizer, step, data order) and finally writes the model
in the official Hugging Face folder layout that ``models.load_model`` reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.config import ModelConfig
from models.data import SPECIAL_TOKENS, corpus_files, default_corpus, pack_sequences, train_tokenizer
from models.loading import ar_checkpoint_name, load_model, load_tokenizer, load_weights, save_model
from models.model import TriModeModel
from models.training import Noise, draw_noise, joint_loss

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EVAL_MASK_RATIOS = (0.25, 0.5, 0.75)


@dataclass
class TrainSettings:
    """Everything a run needs; saved beside the checkpoints so a resume uses the same settings."""

    output: str
    corpus: str | None = None
    init_from: str | None = None
    resume: bool = False
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 768
    seq_len: int = 256
    block_size: int = 32
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dlm_weight: float = 0.3
    ar_weight: float = 1.0
    # self-distillation (with init_from): this share of each batch is the initial model's own greedy
    # continuations of training prefixes, trained with the diffusion term only, so that block
    # diffusion learns to commit what AR would emit; the AR term sees real text alone
    distill_fraction: float = 0.0
    distill_sequences: int = 2048
    distill_prefix: int = 96  # corpus tokens before each continuation
    # infilling: this share of each batch is masked as infilling decodes (a leading span of every block,
    # the rest of the block clean; models.training.draw_noise), so masked slots learn to use the text after them
    infill_fraction: float = 0.0
    eval_every: int = 200
    eval_sequences: int = 32
    checkpoint_every: int = 200
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    save_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(
            {
                "model_type": "nemotron_labs_diffusion",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "mask_token_id": SPECIAL_TOKENS.index("<mask>"),
                "bos_token_id": SPECIAL_TOKENS.index("<s>"),
                "eos_token_id": SPECIAL_TOKENS.index("</s>"),
                "pad_token_id": SPECIAL_TOKENS.index("<pad>"),
                "block_size": self.block_size,
                "max_position_embeddings": self.seq_len,
                "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                "torch_dtype": "float32",
                "dlm_paradigm": "bidirectional",
            }
        )


# ----- data (driver side) -------------------------------------------------------------------------
def prepare_data(settings: TrainSettings) -> Path:
    """Tokenizer + packed train/held-out sequences under ``output/data`` (reused when present)."""
    out = Path(settings.output)
    data_dir = out / "data"
    tensors = data_dir / "sequences.pt"
    if tensors.is_file():
        return tensors
    root = Path(settings.corpus) if settings.corpus else default_corpus()
    train_files, heldout_files = corpus_files(root)
    tok_dir = out / "tokenizer"
    if settings.init_from:  # continue with the tokenizer the initial model was trained with
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (Path(settings.init_from) / name).is_file():
                shutil.copy(Path(settings.init_from) / name, tok_dir / name)
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = train_tokenizer(train_files, settings.vocab_size, tok_dir, settings.seq_len)
    data_dir.mkdir(parents=True, exist_ok=True)
    train = pack_sequences(train_files, tokenizer, settings.seq_len)
    heldout = pack_sequences(heldout_files, tokenizer, settings.seq_len) if heldout_files else train[:0]
    splits = {"train": train, "heldout": heldout}
    if settings.distill_fraction > 0:
        splits["distill"] = distilled(settings, train)
    torch.save(splits, tensors)
    meta = {"corpus": str(root), "train_files": len(train_files), "heldout_files": len(heldout_files)}
    meta.update(train_sequences=len(train), heldout_sequences=len(heldout), seq_len=settings.seq_len)
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return tensors


def distilled(s: TrainSettings, train: torch.Tensor) -> torch.Tensor:
    """The initial model's greedy continuations of ``distill_sequences`` training prefixes, seq_len long."""
    from cluster.self_distill import continue_greedily, cut_prefixes

    if not s.init_from:
        raise ValueError("distill_fraction needs init_from: the model whose continuations are the targets")
    if not 0 < s.distill_fraction < 1 or not 0 < s.distill_prefix < s.seq_len:
        raise ValueError("distill_fraction must be in (0, 1) and distill_prefix in (0, seq_len)")
    model = load_model(s.init_from, dtype=torch.float32, adapter=False, warm_up=False)
    gen = torch.Generator().manual_seed(s.seed)
    prefixes = cut_prefixes(train, s.distill_sequences, s.distill_prefix, s.distill_prefix, gen)
    rows = continue_greedily(model, prefixes, s.seq_len, "distill")
    if not len(rows):
        raise ValueError("every self-distilled continuation ended early (EOS): no rows to train on")
    return rows


def batch_rows(s: TrainSettings, rows: torch.Tensor, data: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, which rows are real text) of one step: the shuffled real rows, the last
    ``distill_fraction`` of them replaced by self-distilled ones drawn for this step."""
    batch = data["train"][rows]
    distill = data.get("distill")
    count = round(len(rows) * s.distill_fraction) if distill is not None else 0
    real = torch.ones(len(rows), dtype=torch.bool)
    if count:
        pick = torch.randint(len(distill), (count,), generator=torch.Generator().manual_seed(s.seed + step))
        batch = torch.cat([batch[: len(rows) - count], distill[pick]])
        real[len(rows) - count :] = False
    return batch.long(), real


# ----- worker side ----------------------------------------------------------------------------
class JointObjective(nn.Module):
    """The model plus its loss in ``forward``, so DDP sees one forward per step."""

    def __init__(self, model: TriModeModel, settings: TrainSettings) -> None:
        super().__init__()
        self.model = model
        self.settings = settings

    def forward(self, batch: torch.Tensor, masked: torch.Tensor, p: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        s = self.settings
        noise = Noise(masked, p)
        weights = {"dlm_weight": s.dlm_weight, "ar_weight": s.ar_weight}
        return joint_loss(self.model, batch, noise, block_size=s.block_size, ar_rows=real, **weights).loss


def init_weights(model: TriModeModel, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) for matrices, ones for norms (the family's initializer)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def initialise_from(model: TriModeModel, folder: Path) -> None:
    """Start from an existing checkpoint: a tri-mode one, or a plain AR one (the family's recipe
    converts an AR model: its ``lm_head`` becomes the one ``diffusion_head``)."""
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") == "nemotron_labs_diffusion":
        model.load_state_dict(load_model(folder, dtype=torch.float32, tokenizer=False, warm_up=False).state_dict())
    else:
        load_weights(model, folder, dtype=torch.float32, rename=ar_checkpoint_name)


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: TriModeModel, heldout: torch.Tensor, s: TrainSettings) -> dict[str, float]:
    """Held-out AR cross-entropy, diffusion cross-entropy at fixed mask ratios, and infilling
    cross-entropy (nats/token)."""
    if len(heldout) == 0:
        return {}
    model.eval()
    batch = heldout[: s.eval_sequences].long()
    gen = torch.Generator().manual_seed(1234)
    metrics = {}
    for ratio in EVAL_MASK_RATIOS:
        masked = torch.rand(batch.shape, generator=gen) < ratio
        p = torch.full((len(batch),), ratio)
        parts = joint_loss(model, batch, Noise(masked, p), block_size=s.block_size)
        metrics[f"eval_diffusion_ce@{ratio}"] = float(parts.diffusion_sum) * ratio / max(parts.masked_tokens, 1)
        metrics["eval_ar_ce"] = float(parts.ar_sum) / parts.ar_tokens
    # infilling: the first quarter of every block masked, the rest of the block in sight
    leading = (torch.arange(batch.shape[1]) % s.block_size < s.block_size // 4).expand(batch.shape)
    parts = joint_loss(model, batch, Noise(leading, torch.full((len(batch),), 0.25)), block_size=s.block_size)
    metrics["eval_infill_ce"] = float(parts.diffusion_sum) * 0.25 / max(parts.masked_tokens, 1)
    model.train()
    return metrics


def batches_from(rows: int, s: TrainSettings, rank: int, world: int, start_step: int):
    """Endless shuffled passes over the rows (each rank its own stride); resumes at ``start_step``."""
    per_rank = max(1, rows // world)
    steps_per_epoch = max(1, per_rank // s.batch_size)
    step = start_step
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        perm = torch.randperm(rows, generator=torch.Generator().manual_seed(s.seed + epoch))[rank::world]
        lo = offset * s.batch_size
        yield epoch, perm[lo : lo + s.batch_size]
        step += 1


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from tqdm import tqdm

    s = TrainSettings(**config["settings"])
    data = torch.load(config["data"])
    train, heldout = data["train"], data["heldout"]
    if s.distill_fraction > 0 and "distill" not in data:
        raise ValueError(f"{config['data']} has no self-distilled rows: prepare the data with distill_fraction set")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(s.seed + rank)
    if not s.use_gpu:
        torch.set_num_threads(max(1, int(s.cpus_per_worker)))

    model = TriModeModel(s.model_config())
    init_weights(model, s.seed)
    if s.init_from:
        initialise_from(model, Path(s.init_from))
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    start_step, history = 0, []
    state = resume_state(Path(s.output), s.resume, ray.train.get_checkpoint())
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = state["step"], state["history"]
    objective = ray.train.torch.prepare_model(JointObjective(model, s))
    device = next(objective.parameters()).device
    noise_gen = torch.Generator().manual_seed(s.seed * 1000 + rank + start_step)
    batches = batches_from(len(train), s, rank, world, start_step)
    bar = tqdm(total=s.steps, initial=start_step, desc="train", disable=rank != 0, mininterval=5)
    started = time.time() - (history[-1]["wall_s"] if history else 0.0)
    model.train()
    for step in range(start_step, s.steps):
        epoch, rows = next(batches)
        batch, real = batch_rows(s, rows, data, step)
        batch = batch.to(device)
        noise = draw_noise(batch, noise_gen, block_size=s.block_size, infill_fraction=s.infill_fraction)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        loss = objective(batch, noise.masked.to(device), noise.p.to(device), real.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), s.grad_clip)
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        metrics = {"step": done, "epoch": epoch, "loss": loss.item(), "lr": learning_rate(step, s)}
        if rank == 0 and (done % s.eval_every == 0 or done == s.steps):
            metrics.update(evaluate(model, heldout.to(device), s))
            metrics["wall_s"] = time.time() - started
            history.append(metrics)
            with open(Path(s.output) / "history.jsonl", "a") as log:
                log.write(json.dumps(metrics) + "\n")
        if done % s.checkpoint_every == 0 or done == s.steps:
            save_checkpoint(model, optimizer, done, history, metrics, Path(s.output), rank)
    bar.close()
    if rank == 0:
        export(model, s)


def resume_state(folder: Path, resume: bool, ray_checkpoint) -> dict | None:
    """Ray's own checkpoint after a worker restart, else ``folder/checkpoint`` when resuming."""
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:
            return torch.load(Path(folder) / "state.pt", weights_only=False)
    local = folder / "checkpoint" / "state.pt"
    if resume and local.is_file():
        return torch.load(local, weights_only=False)
    return None


def save_checkpoint(model, optimizer, step, history, metrics, folder: Path, rank: int) -> None:
    """Rank 0 writes ``folder/checkpoint/state.pt`` (atomically) and reports it to Ray; others only report."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "history": history}
    target = folder / "checkpoint"
    target.mkdir(parents=True, exist_ok=True)
    torch.save(state, target / "state.tmp")
    os.replace(target / "state.tmp", target / "state.pt")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(target / "state.pt", Path(tmp) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def export(model: TriModeModel, s: TrainSettings) -> Path:
    """The trained model as an official Hugging Face folder: ``output/model``."""
    from models.loading import resolve_dtype

    folder = Path(s.output) / "model"
    save_model(model, folder, dtype=resolve_dtype(s.save_dtype, model.config))
    for name in TOKENIZER_FILES:
        src = Path(s.output) / "tokenizer" / name
        if src.is_file():
            shutil.copy(src, folder / name)
    return folder


# ----- driver ---------------------------------------------------------------------------------
def resolve_paths(settings, *names: str) -> None:
    """Make the named path settings absolute: Ray Train's workers do not run in the caller's directory."""
    for name in names:
        if getattr(settings, name):
            setattr(settings, name, str(Path(getattr(settings, name)).resolve()))


def settings_of_run(settings, folder: Path):
    """The settings a run in ``folder`` goes on with: on ``resume`` the saved ones (only the step
    count taken from ``settings``), else ``settings``; either way saved there for the next resume."""
    saved = folder / "settings.json"
    if settings.resume and saved.is_file():
        previous = json.loads(saved.read_text())
        previous.update(steps=settings.steps, resume=True)
        settings = type(settings)(**previous)
    saved.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    return settings


def fit(loop, settings, data: Path, folder: Path, num_workers: int = 1, use_gpu: bool = False) -> None:
    """Run ``loop`` on Ray Train workers (``settings.cpus_per_worker`` CPUs each) with the settings and
    the prepared data's path; Ray keeps its own run state under ``folder/ray``. Ray must be up."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        loop,
        train_loop_config={"settings": asdict(settings), "data": str(data)},
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": settings.cpus_per_worker}
        ),
        run_config=RunConfig(storage_path=str(folder / "ray"), name="run"),
    ).fit()


def run(settings: TrainSettings) -> Path:
    """Prepare data, train on Ray Train, return the exported model folder."""
    from cluster.local import ensure_ray

    ensure_ray()
    resolve_paths(settings, "output", "init_from", "corpus")
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_of_run(settings, out)
    fit(train_loop, settings, prepare_data(settings), out, settings.num_workers, settings.use_gpu)
    return out / "model"
