"""Checkpoint loading: single file, sharded, round trip, adapters, and every error named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from models.config import ConfigError, ModelConfig
from models.draft_training import MLP_MODULES
from models.loading import CheckpointError, save_model
from models.matmul import cpu_has_fast_half
from tests.conftest import random_model, tiny_config


def _same_weights(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_fixture_config_fields(fixture_path):
    cfg = ModelConfig.from_file(fixture_path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (256, 6, 8, 2)
    assert cfg.head_dim == 32 and cfg.mask_token_id == 3 and cfg.eos_token_id == 2 and cfg.block_size == 32
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 16.0 and cfg.rope.llama_4_scaling_beta == 0.1
    assert cfg.extra["dlm_paradigm"] == "bidirectional"  # unknown fields are kept


def test_yarn_frequencies_match_transformers(fixture_path):
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from models.layers import yarn_inverse_frequencies

    raw = json.loads((fixture_path / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw)
    hf = PretrainedConfig(**raw)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    assert torch.equal(yarn_inverse_frequencies(cfg.rope, cfg.head_dim), inv_freq)
    assert cfg.rope.yarn_attention_factor == pytest.approx(factor)


def test_llama4_query_scale():
    from models.layers import Rotary

    cfg = tiny_config()
    rotary = Rotary(cfg.rope, cfg.head_dim)
    positions = torch.tensor([0, 127, 128, 300, 1000])
    _, _, scale = rotary(positions, torch.float32)
    expected = 1 + 0.1 * torch.log(1 + torch.floor(positions / 128.0))
    assert torch.allclose(scale.flatten(), expected)
    assert scale.flatten()[0] == 1.0 and scale.flatten()[2] > 1.0


def test_round_trip_and_sharded_equal_single(tmp_path):
    model = random_model(seed=1)
    save_model(model, tmp_path / "single")
    save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    single = models.load_model(tmp_path / "single")
    sharded = models.load_model(tmp_path / "sharded")
    assert _same_weights(model, single) and _same_weights(single, sharded)
    prompt = [1, 5, 9, 11]
    a = models.generate(single, prompt, mode="ar", max_new_tokens=8)
    b = models.generate(sharded, prompt, mode="ar", max_new_tokens=8)
    assert a.tokens == b.tokens


def test_dtype_from_config_and_override(tmp_path):
    model = random_model()
    save_model(model, tmp_path, dtype=torch.bfloat16)
    # a bf16 checkpoint computes in bf16 where the CPU has bf16 instructions, in fp32 where it has not
    default = torch.bfloat16 if cpu_has_fast_half() else torch.float32
    assert models.load_model(tmp_path).dtype == default
    assert models.load_model(tmp_path, dtype="bfloat16").dtype == torch.bfloat16
    assert models.load_model(tmp_path, dtype="float32").dtype == torch.float32
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        models.load_model(tmp_path, dtype="int3")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(tmp_path / "nope")


@pytest.fixture
def saved(tmp_path):
    save_model(random_model(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor_named(saved):
    _rewrite_weights(saved, lambda t: t.pop("encoder.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: encoder\.layers\.1\.mlp\.up_proj\.weight"):
        models.load_model(saved)


def test_unexpected_tensor_named(saved):
    _rewrite_weights(saved, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: lm_head\.weight"):
        models.load_model(saved)


def test_shape_mismatch_named(saved):
    _rewrite_weights(saved, lambda t: t.update({"encoder.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for encoder\.norm\.weight"):
        models.load_model(saved)


def test_unsupported_model_type(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        models.load_model(saved)


def test_missing_required_field(saved):
    raw = json.loads((saved / "config.json").read_text())
    del raw["mask_token_id"]
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="missing required field 'mask_token_id'"):
        models.load_model(saved)


def test_no_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        models.load_model(saved)


def test_fixture_tokenizer_loads_without_remote_code(fixture_model):
    tok = fixture_model.tokenizer
    assert tok is not None and tok.mask_token_id == 3
    assert tok.encode("def f():")[0] == tok.bos_token_id


def _write_adapter(folder, model, rank=4, alpha=8, scale_b=0.5, mlp_rank=0):
    """A random PEFT draft adapter on o_proj (as the official one) and, with ``mlp_rank``, on the MLP's
    projections too (their ranks and alphas in ``rank_pattern``/``alpha_pattern``, scale 1)."""
    adapter = folder / "linear_spec_lora"
    adapter.mkdir()
    ranks = {"o_proj": rank} | {name: mlp_rank for name in MLP_MODULES if mlp_rank}
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(ranks)}
    if mlp_rank:
        cfg["rank_pattern"] = {name: mlp_rank for name in MLP_MODULES}
        cfg["alpha_pattern"] = {name: mlp_rank for name in MLP_MODULES}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(5)
    tensors = {}
    for i, layer in enumerate(model.encoder.layers):
        for name, r in ranks.items():
            path = f"self_attn.{name}" if name == "o_proj" else f"mlp.{name}"
            weight = layer.get_submodule(path).weight
            prefix = f"base_model.model.encoder.layers.{i}.{path}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, weight.shape[1]) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(weight.shape[0], r) * scale_b
    save_file(tensors, adapter / "adapter_model.safetensors")
    return adapter


def _draft_logits(model, prompt: list[int], block: int = 4) -> torch.Tensor:
    """Logits of a linear-spec draft block (adapter rows) after ``prompt``."""
    from models.draft_training import draft_logits

    sequence = torch.tensor([prompt + [0] * (block - 1)])
    with torch.no_grad():
        return draft_logits(model, sequence, len(prompt) - 1, block)


@pytest.mark.parametrize("mlp_rank", [0, 2], ids=["o_proj", "o_proj+mlp"])
def test_adapter_changes_drafts_only(saved, mlp_rank):
    base = models.load_model(saved)
    _write_adapter(saved, base, mlp_rank=mlp_rank)
    with_adapter = models.load_model(saved)
    assert with_adapter.has_adapter and with_adapter.encoder.layers[0].self_attn.lora.scale == 2.0
    mlp_lora = with_adapter.encoder.layers[0].mlp.lora
    assert sorted(mlp_lora) == (sorted(MLP_MODULES) if mlp_rank else [])
    assert all(w.a.shape[0] == mlp_rank and w.scale == 1.0 for w in mlp_lora.values())
    in_bf16 = models.load_model(saved, dtype="bfloat16").encoder.layers[0].self_attn.lora
    assert in_bf16.a.dtype == in_bf16.b.dtype == torch.float32  # PEFT's default for a half-precision base
    prompt = [1, 7, 9, 13, 21]
    assert not torch.equal(_draft_logits(base, prompt), _draft_logits(with_adapter, prompt))  # drafts change
    if mlp_rank:  # and the MLP's factors are part of that change
        for layer in with_adapter.encoder.layers:
            layer.mlp.lora = {}
        assert not torch.equal(_draft_logits(with_adapter, prompt), _draft_logits(models.load_model(saved), prompt))
    ar_base = models.generate(base, prompt, mode="ar", max_new_tokens=12)
    ar_lora = models.generate(with_adapter, prompt, mode="ar", max_new_tokens=12)
    assert ar_base.tokens == ar_lora.tokens  # verification and AR never use the adapter
    spec = models.generate(with_adapter, prompt, mode="linear_spec", max_new_tokens=12, block_length=4)
    assert spec.tokens == ar_base.tokens  # still lossless
    drafts = [
        models.generate(m, prompt, mode="diffusion", max_new_tokens=8, block_length=8) for m in (base, with_adapter)
    ]
    assert drafts[0].tokens == drafts[1].tokens  # diffusion mode runs adapter-off as the reference


def test_adapter_errors(saved):
    base = models.load_model(saved)
    adapter = _write_adapter(saved, base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "o_proj"]}))
    with pytest.raises(CheckpointError, match="must target some of"):
        models.load_model(saved)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors.pop("base_model.model.encoder.layers.1.self_attn.o_proj.lora_B.weight")
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="missing lora_A/lora_B of o_proj for layer 1"):
        models.load_model(saved)
    shutil.rmtree(adapter)
    assert not models.load_model(saved).has_adapter
    adapter = _write_adapter(saved, base, mlp_rank=2)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["o_proj"]}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor in adapter: .*\.mlp\.(gate|up|down)_proj"):
        models.load_model(saved)
    (adapter / "adapter_config.json").write_text(
        json.dumps({**cfg, "rank_pattern": {**cfg["rank_pattern"], "down_proj": 3}})
    )
    with pytest.raises(CheckpointError, match="shape mismatch at layer 0: .* down_proj .* at rank 3"):
        models.load_model(saved)
