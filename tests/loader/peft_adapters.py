"""Adapter folders for the adapter tests: written by PEFT itself on the demo model (so the files are
exactly what users have), or the demo adapter copied and then broken on purpose; and PEFT's own
greedy tokens and log-probabilities on a folder, the reference ours must equal."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL

Tensors = dict[str, torch.Tensor]


def base_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()


def write_peft_adapter(folder: Path, seed: int = 0, config: PeftConfig | None = None, safe: bool = True,
                       **lora: Any) -> Path:
    """PEFT's get_peft_model + save_pretrained on the demo model, with random non-zero lora_B (a
    freshly made adapter is a no-op) so each adapter changes the model's output."""
    torch.manual_seed(seed)
    config = config or LoraConfig(task_type="CAUSAL_LM", **lora)
    peft_model = get_peft_model(base_model(), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.08)
    peft_model.save_pretrained(str(folder), safe_serialization=safe)
    return folder


def copy_demo_adapter(folder: Path, config: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
                      raw_config: str | None = None, tensors: Callable[[Tensors], Tensors] | None = None) -> Path:
    """The demo adapter with `config` fields changed (`drop`: removed), or the whole config file
    replaced by `raw_config`, and its tensors passed through `tensors`."""
    shutil.copytree(DEMO_ADAPTER, folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(config or {})
    for key in drop:
        cfg.pop(key)
    cfg_path.write_text(raw_config if raw_config is not None else json.dumps(cfg))
    if tensors is not None:
        path = folder / "adapter_model.safetensors"
        save_file(tensors(load_file(str(path))), str(path))
    return folder


def first_key(tensors: Tensors, part: str) -> str:
    return next(k for k in sorted(tensors) if f".{part}." in k)


@torch.no_grad()
def peft_greedy(folder: Path | None, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and each one's log-probability from PEFT's forward on the base (None: the base
    alone), recomputing the whole sequence at each step (no cache: the plainest reference)."""
    model = base_model()
    if folder is not None:
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    out = []
    for prompt in prompts:
        ids, tokens, logprobs = list(prompt), [], []
        for _ in range(max_new):
            # on the model's own device: with Unsloth imported (other tests) it may load onto the GPU
            logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(float(lp[token]))
            ids.append(token)
        out.append((tokens, logprobs))
    return out
