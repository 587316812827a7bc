"""AR tokens/s of triserve against Hugging Face transformers' own generate on the same weights.

    python bench/generate_speed.py [--model PATH] [--max-new-tokens 128] [--repeats 3]

The tri-mode checkpoint is a Ministral-3 decoder with one head, so transformers can run its AR
mode as ``Ministral3ForCausalLM`` once the tensors are renamed (encoder.* -> model.*,
diffusion_head -> lm_head). Both decode the same prompts greedily; the table shows tokens/s and
whether the tokens agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import time

import torch

import models

FIXTURE = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "tiny-trimode-code"


def as_transformers(model: models.TriModeModel):
    from transformers import Ministral3Config, Ministral3ForCausalLM

    cfg = model.config
    hf_config = Ministral3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        rope_parameters=cfg.rope.to_dict(),
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "sdpa"
    hf = Ministral3ForCausalLM(hf_config).to(model.dtype).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        state[name.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head")] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from bench.tpf import fixture_prompts

    model = models.load_model(args.model)
    hf = as_transformers(model)
    prompts = fixture_prompts()
    results = {"triserve": [0, 0.0], "transformers": [0, 0.0]}
    agree = total = 0
    for _ in range(args.repeats):
        for prompt in prompts:
            start = time.perf_counter()
            ours = models.generate(model, prompt, mode="ar", max_new_tokens=args.max_new_tokens)
            results["triserve"][1] += time.perf_counter() - start
            results["triserve"][0] += len(ours.tokens)
            ids = torch.tensor([prompt])
            start = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(
                    ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False
                )
            results["transformers"][1] += time.perf_counter() - start
            theirs = out[0, len(prompt) :].tolist()
            results["transformers"][0] += len(theirs)
            agree += sum(a == b for a, b in zip(ours.tokens, theirs))
            total += len(ours.tokens)
    print(f"{'engine':<14}{'tokens':>8}{'seconds':>9}{'tok/s':>8}")
    for name, (tokens, seconds) in results.items():
        print(f"{name:<14}{tokens:>8}{seconds:>9.2f}{tokens / seconds:>8.1f}")
    print(f"greedy token agreement: {agree / total:.1%}")


if __name__ == "__main__":
    main()
