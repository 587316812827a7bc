"""A full 8B-shaped forward per mode with random weights, against the bandwidth floor.

    python bench/forward.py [--context 4096] [--block 32] [--layers 34]

Cases: AR token, draft block, verify block, quadratic cycle (batch 1). The floor is the weight
bytes read once per forward divided by the measured copy bandwidth. Without a GPU it says so and
exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
from functools import partial

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--quadratic-block", type=int, default=8)
    parser.add_argument("--layers", type=int, default=34)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/forward.py needs a CUDA GPU (none found); nothing to measure.")
        return 0
    import triton.testing

    from models.batch import pack
    from models.config import ModelConfig
    from models.engine import KVCacheManager
    from models.model import TriModeModel
    from models.segments import bidirectional_segment, causal_segment, quadratic_segment

    config = ModelConfig.from_dict(
        {
            "model_type": "nemotron_labs_diffusion",
            "vocab_size": 131072,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": args.layers,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "mask_token_id": 100,
            "eos_token_id": 11,
            "block_size": 32,
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 16.0,
                "original_max_position_embeddings": 16384,
                "llama_4_scaling_beta": 0.1,
            },
            "torch_dtype": "bfloat16",
        }
    )
    with torch.device("cuda"):
        model = TriModeModel(config).to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / (triton.testing.do_bench(lambda: dst.copy_(src)) * 1e-3)
    ctx = args.context
    pages = (ctx + 2048) // 16 + 1
    cache, kv = model.new_cache(num_pages=pages, page_size=16), KVCacheManager(pages, 16, device="cuda")
    kv.add(0)
    kv.reserve(0, ctx + 1100)
    kv.set_length(0, ctx)
    L, Lq = args.block, args.quadratic_block
    cases = {
        "AR token": causal_segment([5], ctx, write=True),
        f"draft block ({L})": bidirectional_segment([5] * L, ctx, adapter=True),
        f"verify block ({L})": causal_segment([5] * L, ctx, write=True),
        f"quadratic cycle (L={Lq}, {Lq * (Lq + 1)} tokens)": quadratic_segment([5] * Lq, ctx, Lq, 100),
    }
    floor_ms = weight_bytes / bandwidth * 1e3
    print(
        f"{torch.cuda.get_device_name()}: {weight_bytes / 1e9:.1f} GB of weights, copy {bandwidth / 1e12:.2f} TB/s, "
        f"floor {floor_ms:.2f} ms per forward, context {ctx}"
    )
    for name, segment in cases.items():
        batch = pack([(0, segment)], kv, device="cuda")
        ms = triton.testing.do_bench(partial(model, batch, cache), warmup=5, rep=30)
        print(f"{name:<40}{ms:>9.2f} ms{floor_ms / ms:>9.1%} of the bandwidth floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
