"""Training data: a corpus of text files, a byte-level BPE tokenizer, packed token sequences.

Default corpus: the CPython standard library of the running interpreter without its test suites;
modules whose top-level name starts with t-z are held out for evaluation (as for the fixture).
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")  # ids 0, 1, 2, 3
# a plain-text chat layout for models trained without one (role: content lines, then "assistant:")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
HELDOUT_INITIALS = tuple("tuvwxyz")


def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(path: Path, root: Path) -> bool:
    """Held out when the top-level module (first path part, without .py) starts with t-z."""
    top = path.relative_to(root).parts[0]
    return top.lstrip("_").lower().startswith(HELDOUT_INITIALS)


def corpus_files(root: Path, suffixes: tuple[str, ...] = (".py",)) -> tuple[list[Path], list[Path]]:
    """(train, held-out) text files under ``root``, test suites excluded."""
    train, heldout = [], []
    for path in sorted(root.rglob("*")):
        if path.suffix not in suffixes or not path.is_file():
            continue
        rel = path.relative_to(root)
        if TEST_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        (heldout if is_heldout(path, root) else train).append(path)
    if not train:
        raise ValueError(f"no training files ({', '.join(suffixes)}) under {root}")
    return train, heldout


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int, out_dir: Path, model_max_length: int):
    """Byte-level BPE with <pad>, <s>, </s>, <mask>; saved in the Hugging Face layout, loaded back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((read_text(f) for f in files), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    from models.loading import load_tokenizer

    return load_tokenizer(out_dir)


def pack_sequences(files: list[Path], tokenizer, seq_len: int) -> torch.Tensor:
    """Documents as ``<s> text </s>``, concatenated and cut into rows of ``seq_len`` tokens."""
    stream: list[int] = []
    for path in files:
        stream.append(tokenizer.bos_token_id)
        stream.extend(tokenizer.encode(read_text(path), add_special_tokens=False))
        stream.append(tokenizer.eos_token_id)
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: rows * seq_len], dtype=torch.int32).view(rows, seq_len)
