"""lm-evaluation-harness as a real client: its ``local-completions`` model against the served app on
two small local tasks cut from held-out code (a loglikelihood one and a generate_until one, no
downloads); the loglikelihoods it reports equal ``models.score`` in-process."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

import models
from tests.conftest import API_KEY

pytestmark = pytest.mark.ray


def heldout_rows(count: int) -> list[dict[str, str]]:
    """A def line as context and the line after it as the continuation, from modules t-z of the
    standard library (held out of the bundled model's training)."""
    rows = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[t-z]*.py")):
        lines = path.read_text(errors="replace").splitlines()
        for first, second in zip(lines, lines[1:]):
            if first.startswith("def ") and first.endswith(":") and second.strip() and len(second) < 60:
                rows.append({"context": first + "\n", "continuation": second})
                break
        if len(rows) == count:
            return rows
    return rows


def write_tasks(folder: Path, rows: list[dict[str, str]]) -> None:
    data = folder / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{continuation}}",
    }
    ll = {
        **common,
        "task": "triserve_heldout_ll",
        "output_type": "loglikelihood",
        "metric_list": [{"metric": "perplexity"}],
    }
    gen = {
        **common,
        "task": "triserve_heldout_gen",
        "output_type": "generate_until",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False, "temperature": 0},
        "metric_list": [{"metric": "exact_match"}],
    }
    for spec in (ll, gen):
        (folder / f"{spec['task']}.yaml").write_text(json.dumps(spec))  # JSON is YAML


def test_lm_eval_local_completions(app, fixture_path, fixture_model, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = heldout_rows(6)
    write_tasks(tmp_path, rows)
    args = f"model=tiny,base_url={app}/v1/completions,tokenizer={fixture_path},tokenizer_backend=huggingface"
    lm = get_model("local-completions").create_from_arg_string(args + ",num_concurrent=1,max_retries=1")
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["triserve_heldout_ll", "triserve_heldout_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    samples = results["samples"]["triserve_heldout_ll"]
    assert len(samples) == len(rows)
    for sample in samples:
        context, continuation = sample["arguments"][0]
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        expected = sum(models.score(fixture_model, context_ids + continuation_ids)[len(context_ids) - 1 :])
        assert sample["resps"][0][0][0] == pytest.approx(expected, abs=1e-4)
    generated = results["samples"]["triserve_heldout_gen"]
    assert len(generated) == len(rows) and all(isinstance(s["resps"][0][0], str) for s in generated)
    assert "exact_match,none" in results["results"]["triserve_heldout_gen"]
