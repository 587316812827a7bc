"""Self-distilled training data: corpus prefixes continued by the model's own greedy AR decoding.

Both the drafter (cluster/train_drafter.py) and the diffusion fine-tune (``triserve train
--distill-fraction``) learn to predict what the model itself would emit, so the continuations are
decoded by the serving engine in one batch (thousands take minutes) and the targets are exactly
what the AR verifier accepts.
"""

from __future__ import annotations

import torch

from models.model import TriModeModel


def cut_prefixes(rows: torch.Tensor, count: int, min_len: int, max_len: int, gen: torch.Generator) -> list[list[int]]:
    """``count`` windows of min_len..max_len tokens from random packed rows at random offsets."""
    out = []
    for _ in range(count):
        row = rows[int(torch.randint(len(rows), (1,), generator=gen))]
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        start = int(torch.randint(0, rows.shape[1] - length + 1, (1,), generator=gen))
        out.append(row[start : start + length].tolist())
    return out


@torch.inference_mode()
def continue_greedily(model: TriModeModel, prefixes: list[list[int]], total: int, desc: str) -> torch.Tensor:
    """Each prefix followed by the model's greedy AR continuation up to ``total`` tokens, decoded as
    one batch by the serving engine; rows that end early (EOS) are dropped. [rows, total] int32."""
    from tqdm import tqdm

    from models.engine import Engine
    from models.modes import DecodeParams

    engine = Engine(model, num_pages=64 * (total // 16 + 4), max_running=64, max_step_tokens=4096)
    states = []
    for i, prefix in enumerate(prefixes):
        params = DecodeParams(mode="ar", max_new_tokens=total - len(prefix))
        states.append((prefix, engine.add_request(f"{desc}-{i}", prefix, params).state))
    bar = tqdm(total=len(prefixes), desc=desc, mininterval=5)
    while engine.has_work:
        bar.update(sum(out.finished for out in engine.step()))
    bar.close()
    rows = [prefix + state.tokens for prefix, state in states if len(prefix) + len(state.tokens) == total]
    return torch.tensor(rows, dtype=torch.int32)
