"""Decode steps of the Qwen-VL image-text models (the generic path: transformers' own text model)
replay the decode CUDA graphs: on the CPU a stand-in runs what a graph would have captured (the
runner's forward over one position a token, no VisionStep, the decode graphs' own step metadata)
under NoHostSync, and the tokens are still transformers' greedy ones after prompts with images
(the position offered is the token's index plus the prompt's M-RoPE delta), and PEFT's with a
language LoRA per request, read from the graphs' slot buffer. A capture that fails
on such a model leaves its decode steps eager instead of failing the engine."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from test_adapter_modules_step import HostEvent
from test_prefill_graphs import NoHostSync
from vision_models import hf_greedy, make_qwen2_5_vl, random_image, write_adapter

from sloth_serve.engine.cuda_graphs import DecodeGraphs
from sloth_serve.engine.model_runner import ModelRunner
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.llm import LLM
from sloth_serve.loader import DEMO_MODEL

NEW_TOKENS = 6
LANGUAGE_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


class DecodeReplayedOnCPU:
    """Stands in for DecodeGraphs on the CPU: each decode batch offered is written into static
    buffers padded to its bucket, as DecodeGraphs.run does, and the runner's graph forward runs over
    them with DecodeGraphs' own step metadata (the host lists the CPU attention reads filled in)."""

    buckets = (1, 2, 4, 8)
    max_batch = 8
    scratch_state = None

    def __init__(self, runner: ModelRunner, width: int) -> None:
        self.forward = runner._forward_logits
        self.block_size = runner.block_size
        self.scratch = runner.scratch_block
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long)
        self.positions = torch.zeros(n, dtype=torch.long)
        self.slot_mapping = torch.zeros(n, dtype=torch.long)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32)
        self.seq_lens = torch.ones(n, dtype=torch.int32)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32)
        self.lora_slots = torch.full((n,), -1, dtype=torch.int32)
        self.offered: list[list[int]] = []  # the positions of each replayed batch
        self.with_lora: list[bool] = []  # whether each replayed with the adapters' slots

    def capture_all(self, with_lora: bool) -> None:
        pass  # nothing to capture: each replay runs the forward pass

    def forget_lora(self) -> None:
        pass

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
            seq_lens: list[int], lora_slots: list[int] | None, start_event: Any = None,
            input_ids_device: torch.Tensor | None = None, state_slots: list[int] | None = None) -> torch.Tensor:
        b = len(input_ids)
        n = next(size for size in self.buckets if size >= b)
        self.input_ids[:n] = 0
        self.input_ids[:b] = torch.tensor(input_ids) if input_ids_device is None else input_ids_device
        self.positions[:n] = 0
        self.positions[:b] = torch.tensor(positions)
        self.slot_mapping[:n] = self.scratch * self.block_size
        self.slot_mapping[:b] = torch.tensor(slots)
        self.seq_lens[:n] = 1
        self.seq_lens[:b] = torch.tensor(seq_lens)
        self.block_tables[:n] = self.scratch
        for row, table in enumerate(block_tables):
            self.block_tables[row, : len(table)] = torch.tensor(table)
        self.lora_slots[:n] = -1
        if lora_slots is not None:
            self.lora_slots[:b] = torch.tensor(lora_slots)
        meta = DecodeGraphs._meta(self, n, lora_slots is not None)  # type: ignore[arg-type]
        meta.attn.seq_lens_host = self.seq_lens[:n].tolist()
        with NoHostSync():
            logits = self.forward(self.input_ids[:n], self.positions[:n], meta)
        self.offered.append(list(positions))
        self.with_lora.append(lora_slots is not None)
        return logits[:b]


def chat(llm: LLM, num_images: int, question: str) -> str:
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return str(llm.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_decode_steps_replay_the_graphs_with_transformers_tokens(tmp_path: Path, family: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder, hf = make_qwen2_5_vl(tmp_path / family, qwen2=family == "qwen2_vl", qwen3=family.startswith("qwen3"),
                                 moe=family.endswith("moe"))
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=256)
    runner = llm.engine.runner
    assert type(runner.model).supports_cuda_graphs  # LLMEngine gives it decode buckets on CUDA
    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    graphs = DecodeReplayedOnCPU(runner, 16)
    monkeypatch.setattr(runner, "graphs", graphs)
    two = [random_image(1, 30, 20), random_image(2, 17, 33)]
    one = [random_image(3, 32, 32)]  # 8x8 patches: 16 tokens at 4x4 positions
    prompts: list[Any] = [{"prompt": chat(llm, 2, "Compare the two pictures."), "images": two},
                          chat(llm, 0, "No picture here."),
                          {"prompt": chat(llm, 1, "What is this?"), "images": one}]
    outs = llm.generate(prompts, GREEDY)
    for out, images in zip(outs, [two, [], one], strict=True):
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, images, NEW_TOKENS)
    # Every step after the one prompt step was a decode step the graphs ran, all three rows each.
    assert len(graphs.offered) == NEW_TOKENS - 1 and all(len(rows) == 3 for rows in graphs.offered)
    assert graphs.with_lora == [False] * (NEW_TOKENS - 1)
    n = len(outs[2].prompt_token_ids)
    delta = 4 - 16  # the image's 16 tokens take 4 positions
    assert [rows[2] for rows in graphs.offered] == [p + delta for p in range(n, n + NEW_TOKENS - 1)]
    m = len(outs[1].prompt_token_ids)
    assert [rows[1] for rows in graphs.offered] == list(range(m, m + NEW_TOKENS - 1))


def test_language_lora_per_request_through_the_graphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, hf = make_qwen2_5_vl(tmp_path / "model")
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=256, max_loras=2, max_lora_rank=8)
    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    graphs = DecodeReplayedOnCPU(llm.engine.runner, 16)
    monkeypatch.setattr(llm.engine.runner, "graphs", graphs)
    adapter = write_adapter(copy.deepcopy(hf), tmp_path / "tuned", LANGUAGE_LAYERS)
    llm.adapters.register("tuned", str(adapter))
    images = [random_image(5)]
    prompt: Any = {"prompt": chat(llm, 1, "What is it?"), "images": images}
    tuned, plain = llm.generate([prompt, prompt], GREEDY, adapter=["tuned", None])
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    assert tuned.token_ids == hf_greedy(peft, tuned.prompt_token_ids, images, NEW_TOKENS)
    assert plain.token_ids == hf_greedy(hf, plain.prompt_token_ids, images, NEW_TOKENS) != tuned.token_ids
    assert graphs.with_lora == [True] * (NEW_TOKENS - 1)


class FailingCapture:
    """Decode graphs whose capture fails as a CUDA capture does on a host read."""

    max_batch = 8

    def capture_all(self, with_lora: bool) -> None:
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def test_failed_capture_of_a_generic_model_leaves_decode_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    folder, hf = make_qwen2_5_vl(tmp_path / "model")
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8)
    runner = llm.engine.runner
    monkeypatch.setattr(runner, "graphs", FailingCapture())
    with caplog.at_level(logging.WARNING, logger="sloth_serve.engine.model_runner"):
        runner.capture_graphs()
    assert runner.graphs is None
    assert any("decode steps run eagerly" in r.getMessage() and "not permitted" in r.getMessage()
               for r in caplog.records)
    images = [random_image(4)]
    out = llm.generate({"prompt": chat(llm, 1, "What is it?"), "images": images}, GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, images, NEW_TOKENS)
    # Our own models' graphs capture as they always did: a failure there is the engine's to report.
    native = LLM(DEMO_MODEL, load_format="safetensors", dtype="float32", num_kv_blocks=16).engine.runner
    monkeypatch.setattr(native, "graphs", FailingCapture())
    with pytest.raises(RuntimeError, match="not permitted"):
        native.capture_graphs()


def test_an_image_token_computed_alone_beside_decodes_runs_eagerly(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A step where every sequence computes one token may hold a prompt chunk of one image token
    (here the prompt bound beside a decoding stream is 1). An image's first token sits at the same
    position in all three M-RoPE rows, yet its embedding comes from the encoder, which the decode
    graphs never splice in: such a step runs eagerly, and the image request gets transformers' tokens."""
    folder, hf = make_qwen2_5_vl(tmp_path / "model")
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=256, max_prefill_tokens_while_decoding=1)
    engine = llm.engine
    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    graphs = DecodeReplayedOnCPU(engine.runner, 16)
    monkeypatch.setattr(engine.runner, "graphs", graphs)
    engine.add_request("stream", llm.encode(chat(llm, 0, "Tell a story.")),
                       SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    engine.step()  # its prompt, alone: it decodes from here
    images = [random_image(6)]
    ids, mm = llm.encode_prompt({"prompt": chat(llm, 1, "What is it?"), "images": images})
    engine.add_request("image", ids, GREEDY, mm=mm)
    tokens: list[int] = []
    while "image" in engine.seqs:
        for out in engine.step():
            if out.request_id == "image":
                tokens += out.new_token_ids
    assert tokens == hf_greedy(hf, ids, images, NEW_TOKENS)
    # Its prompt went one token a step beside the stream's decodes, through the graphs but for the image's tokens
    assert len(graphs.offered) >= len(ids) - mm.images[0].num_tokens
