"""lm-evaluation-harness itself against a live server (its `local-completions` model: token-id
prompts, echo + logprobs) on a committed multiple-choice task and a rolling-loglikelihood task: its
scores and every per-request log-likelihood equal those of lm-eval's own `hf` backend (transformers)
on the same model and data. No downloads: the tasks read local jsonl files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import LiveServer, launch

from sloth_serve.loader import DEMO_MODEL

# The tasks' data are local files: nothing may reach the Hub (lm_eval is imported below, after this).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parent / "data"
MC_TASK = {
    "task": "sloth_tiny_mc",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": str(DATA / "lm_eval_mc.jsonl")}},
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{answer}}",
    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
}
ROLLING_TASK = {
    "task": "sloth_tiny_rolling",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": str(DATA / "lm_eval_rolling.jsonl")}},
    "test_split": "test",
    "output_type": "loglikelihood_rolling",
    "doc_to_text": "",
    "doc_to_target": "{{text}}",
    "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
}


@pytest.fixture(scope="module")
def float32_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The demo model unquantized in float32, as the `hf` backend loads it."""
    server = launch(tmp_path_factory.mktemp("lm_eval"), "lm-eval", "--load-format", "safetensors",
                    "--dtype", "float32", demo_adapter=False)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def evaluate(model: str, model_args: dict[str, Any]) -> dict[str, Any]:
    from lm_eval import simple_evaluate  # the `test` extra installs it (without torch: the venv's)

    return simple_evaluate(model=model, model_args=model_args, tasks=[MC_TASK, ROLLING_TASK], log_samples=True,
                           batch_size=1, limit=None, bootstrap_iters=0)


def likelihoods(out: dict[str, Any], task: str) -> list[list[float]]:
    """Per document, the log-likelihood of each request (each choice, or the whole text)."""
    docs = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s["resps"]] for s in docs]


def test_lm_eval_scores_over_the_api_equal_the_hf_backend(float32_server: LiveServer) -> None:
    served = evaluate("local-completions", {
        "model": DEMO_MODEL.name, "base_url": f"{float32_server.base_url}/completions",
        "tokenizer_backend": "huggingface", "tokenizer": str(DEMO_MODEL), "tokenized_requests": True,
        "num_concurrent": 1, "max_retries": 1,
    })
    local = evaluate("hf", {"pretrained": str(DEMO_MODEL), "dtype": "float32", "device": "cpu"})
    for task in ("sloth_tiny_mc", "sloth_tiny_rolling"):
        ours, theirs = likelihoods(served, task), likelihoods(local, task)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            assert a == pytest.approx(b, abs=1e-3)
    mc, mc_ref = served["results"]["sloth_tiny_mc"], local["results"]["sloth_tiny_mc"]
    assert mc["acc,none"] == mc_ref["acc,none"] and mc["acc_norm,none"] == mc_ref["acc_norm,none"]
    rolling, rolling_ref = served["results"]["sloth_tiny_rolling"], local["results"]["sloth_tiny_rolling"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert rolling[metric] == pytest.approx(rolling_ref[metric], rel=1e-4)
