"""Each rank of a TP=2 group holds about half of the weights, at every moment of loading.

A ~160 MB fp32 checkpoint is loaded by two gloo ranks, each under a kernel-enforced cap on its
private memory (RLIMIT_DATA = what it uses before loading + 0.7 x the weight bytes + the size of
the safetensors file, which safetensors maps copy-on-write: address space that RLIMIT_DATA counts
although its pages stay the file's): any allocation past the cap fails, so a rank that read the
whole checkpoint (or held all of it at once) could not load. The same cap makes a plain full
load fail, which shows that the cap bites.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from models.loading import save_model
from tests.conftest import random_model
from tests.test_tensor_parallel import free_port

CAP = 0.7  # of the full weight bytes, per rank
# fixed threshold: big blocks are mmap'ed and unmapped on free, so private memory tracks live tensors
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def private_bytes() -> int:
    """VmData: the process's private writable memory, what RLIMIT_DATA limits."""
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def anon_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def cap_private_memory(extra: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (private_bytes() + extra, hard))


def warm_up(path: str) -> None:
    """Build the model once on the meta device: the first construction maps lazily loaded libraries
    (a fixed ~80 MB of private memory, whatever the model's size), which is not weight memory."""
    from models.config import ModelConfig
    from models.model import TriModeModel

    with torch.device("meta"):
        TriModeModel(ModelConfig.from_file(path))


def _rank_main(rank: int, world: int, port: int, path: str, cap: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from models.tensor_parallel import init_rank, load_shard

    init_rank(rank, world, "127.0.0.1", port, backend="gloo")
    warm_up(path)
    before = anon_bytes()
    cap_private_memory(cap)
    shard = load_shard(path, dtype=torch.float32)
    held = sum(p.numel() * p.element_size() for p in shard.parameters())
    torch.save({"held": held, "anon_growth": anon_bytes() - before}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    model = random_model(
        seed=1,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=8192,
    )
    save_model(model, folder)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    return folder, full


def budget(folder, full: int) -> int:
    return int(CAP * full) + (folder / "model.safetensors").stat().st_size


def test_each_rank_loads_and_holds_about_half(big_checkpoint, tmp_path, monkeypatch):
    folder, full = big_checkpoint
    assert full > 150e6
    for name, value in MALLOC_ENV.items():
        monkeypatch.setenv(name, value)  # inherited by the spawned ranks
    mp.spawn(_rank_main, args=(2, free_port(), str(folder), budget(folder, full), str(tmp_path)), nprocs=2)
    for rank in range(2):
        report = torch.load(tmp_path / f"rank{rank}.pt")
        assert 0.45 * full < report["held"] < 0.55 * full  # everything but the norms is split
        assert report["anon_growth"] < 0.6 * full


def test_the_same_cap_stops_a_full_load(big_checkpoint):
    """Control: one process loading the whole checkpoint under the same cap runs out of memory."""
    folder, full = big_checkpoint
    script = (
        "import sys, torch\n"
        "from tests.test_tensor_parallel_memory import cap_private_memory, warm_up\n"
        "from models.loading import load_model\n"
        f"warm_up({str(folder)!r})\n"
        f"cap_private_memory({budget(folder, full)})\n"
        "try:\n"
        f"    load_model({str(folder)!r}, dtype=torch.float32, tokenizer=False)\n"
        "except (RuntimeError, MemoryError) as exc:\n"
        "    print('out of memory:', type(exc).__name__)\n"
        "    sys.exit(3)\n"
    )
    env = {**os.environ, **MALLOC_ENV}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 3 and "out of memory" in done.stdout, done.stdout + done.stderr
