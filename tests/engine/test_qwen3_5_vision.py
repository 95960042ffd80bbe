"""Qwen3.5 with images (Qwen3_5ForConditionalGeneration: our hybrid Gated DeltaNet + attention text
model, transformers' vision encoder in the prefill, interleaved M-RoPE) through the offline LLM: a tiny
random model gives transformers' greedy tokens for one image, two images of different sizes, text only
in the same batch, and prefill chunked across an image; the MoE variant too. Different images give
different outputs, and the prefix cache (KV blocks and the recurrent state's snapshots) is keyed by
the images: a repeated image is served from it, another image never is. LoRA on the encoder per
request gives PEFT's tokens."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapter_modules_step import HostEvent
from test_vision import GREEDY, chat
from test_vision_lora import BOTH, peft_greedy
from vision_models import hf_greedy, random_image, write_adapter
from vision_qwen3_5 import make_qwen3_5_vl

from sloth_serve.llm import LLM
from sloth_serve.models.config import ModelConfig
from sloth_serve.models.qwen3_5 import Qwen3_5ForCausalLM
from sloth_serve.models.qwen3_5_vision import Qwen3_5VisionForCausalLM, mrope_rows
from sloth_serve.models.vision_step import VisionStep

BUDGET = 16  # tokens a step: a prompt's image placeholders are split across prefill chunks


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[LLM, Any]:
    folder, hf = make_qwen3_5_vl(tmp_path_factory.mktemp("qwen3_5_vl") / "model")
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=BUDGET, max_loras=2, max_lora_rank=8)
    return llm, hf


def crosses_a_chunk(mm: Any) -> bool:
    return any(img.offset // BUDGET != (img.offset + img.num_tokens - 1) // BUDGET for img in mm.images)


def test_config_and_model(served: tuple[LLM, Any]) -> None:
    llm, _ = served
    model = llm.engine.runner.model
    cfg = model.config
    assert isinstance(model, Qwen3_5VisionForCausalLM) and cfg.vision_config is not None
    assert cfg.mrope_section == (2, 2, 1) and cfg.kv_layers == [1, 3] and cfg.rotary_dim == 10
    # frequencies t h w t h: height every third from 1 below 6, width every third from 2 below 3
    assert mrope_rows(5, cfg.mrope_section).tolist() == [0, 1, 2, 0, 1]
    assert mrope_rows(32, (11, 11, 10)).tolist()[:4] == [0, 1, 2, 0] and mrope_rows(32, (11, 11, 10))[30:].tolist() == [0, 1]


def test_images_give_transformers_greedy_tokens(served: tuple[LLM, Any]) -> None:
    llm, hf = served
    two = [random_image(1, 30, 20), random_image(2, 17, 33)]
    one = [random_image(3, 32, 32)]
    prompts: list[Any] = [
        {"prompt": chat(llm, 2, "Compare the two pictures."), "images": two},
        chat(llm, 0, "No picture here."),
        {"prompt": chat(llm, 1, "What is this?"), "images": one},
    ]
    outs = llm.generate(prompts, GREEDY)
    ids_two, mm = llm.encode_prompt(prompts[0])
    assert mm is not None and [img.num_tokens for img in mm.images] == [8, 8] and crosses_a_chunk(mm)
    assert outs[0].prompt_token_ids == ids_two
    assert outs[0].token_ids == hf_greedy(hf, ids_two, two)
    assert outs[1].token_ids == hf_greedy(hf, llm.encode(prompts[1]), [])
    assert outs[2].token_ids == hf_greedy(hf, outs[2].prompt_token_ids, one)


def test_image_content_decides_output_and_the_prefix_cache(served: tuple[LLM, Any]) -> None:
    llm, hf = served
    vision = llm.engine.runner.vision
    snapshots = llm.engine.block_manager.snapshots
    assert vision is not None and snapshots is not None
    text = chat(llm, 1, "Describe the colours in this image, please, in some detail, and then say more.")
    first = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    encoded = vision.num_encoded
    other = llm.generate({"prompt": text, "images": [random_image(11)]}, GREEDY)[0]
    # Same token ids, another image: a different answer, and nothing of the image's blocks (nor a
    # state snapshot past its first token) reused.
    assert other.prompt_token_ids == first.prompt_token_ids
    assert other.token_ids != first.token_ids
    assert other.token_ids == hf_greedy(hf, other.prompt_token_ids, [random_image(11)])
    offset = llm.encode_prompt({"prompt": text, "images": [random_image(11)]})[1].images[0].offset  # type: ignore[union-attr]
    assert other.num_cached_tokens <= offset
    assert vision.num_encoded == encoded + 1
    again = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens > offset  # the image's blocks and the state after them came from the cache
    assert vision.num_encoded == encoded + 1
    # The same image with other questions after it: the first snapshots the state where the shared
    # blocks end (past the image), the second restores it; positions after it still follow its grid.
    for question in ("Why?", "And the shapes?"):
        follow = {"prompt": chat(llm, 1, f"Describe the colours in this image, please, in some detail. {question}"),
                  "images": [random_image(10)]}
        out = llm.generate(follow, GREEDY)[0]
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, [random_image(10)])
    assert out.num_cached_tokens > offset


def test_equal_position_rows_rotate_as_plain_rope(served: tuple[LLM, Any]) -> None:
    """M-RoPE whose three rows agree is plain RoPE at that position: what lets a decode step after an
    image prompt replay the text model's CUDA graphs at its position plus the prompt's delta."""
    llm, _ = served
    model = llm.engine.runner.model
    q, k = torch.randn(5, 4, 20), torch.randn(5, 2, 20)
    positions = torch.tensor([0, 3, 17, 40, 41])
    pick = model.mrope_row.view(1, 1, -1).expand(1, 5, -1)
    rows = positions.expand(3, -1)
    cos, sin = (t[rows].gather(0, pick).squeeze(0) for t in (model.rope_cos, model.rope_sin))
    from sloth_kernels.rope import apply_rope_ref

    plain = apply_rope_ref(q, k, positions, model.rope_cos, model.rope_sin)
    mrope = apply_rope_ref(q, k, torch.arange(5), cos, sin)
    for a, b in zip(plain, mrope, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert isinstance(VisionStep(rows, None, None).positions, torch.Tensor)


class PositionsGraphs:
    """Stands in for DecodeGraphs on the CPU: records the positions each decode batch offers it and
    declines (the step then runs eagerly)."""

    max_batch = 8
    scratch_state = None

    def __init__(self) -> None:
        self.offered: list[list[int]] = []

    def run(self, **kwargs: Any) -> None:
        self.offered.append(list(kwargs["positions"]))
        return None


def test_decode_graphs_are_offered_positions_past_the_image(served: tuple[LLM, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps of an image prompt go to the graphs at position + the prompt's M-RoPE delta
    (images advance positions by their larger merged side, not by their token count)."""
    llm, _ = served
    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    graphs = PositionsGraphs()
    monkeypatch.setattr(llm.engine.runner, "graphs", graphs)
    image = random_image(12, 32, 32)  # 8x8 patches: 16 tokens, 4 positions
    out = llm.generate({"prompt": chat(llm, 1, "Shapes?"), "images": [image]}, GREEDY)[0]
    n = len(out.prompt_token_ids)
    delta = 4 - 16
    assert graphs.offered == [[p + delta] for p in range(n, n + len(out.token_ids) - 1)]


def test_moe_variant_gives_transformers_greedy_tokens(tmp_path: Path) -> None:
    folder, hf = make_qwen3_5_vl(tmp_path / "moe", moe=True)
    assert ModelConfig.from_folder(folder).num_experts == 4
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=BUDGET)
    images = [random_image(8, 24, 40), random_image(9)]
    out = llm.generate({"prompt": chat(llm, 2, "Which is brighter?"), "images": images}, GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, images)


def test_vision_lora_per_request_equals_peft(served: tuple[LLM, Any], tmp_path: Path) -> None:
    """An adapter on the encoder's linears and the language layers (FastVisionModel's
    finetune_vision_layers=True), per request beside the base in one batch: PEFT's tokens for each."""
    llm, hf = served
    adapter = write_adapter(copy.deepcopy(hf), tmp_path / "both", BOTH)
    llm.adapters.register("both", str(adapter))
    images = [random_image(7)]
    prompt = {"prompt": chat(llm, 1, "What is it?"), "images": images}
    tuned, plain = llm.generate([prompt, prompt], GREEDY, adapter=["both", None])
    expected = peft_greedy(hf, adapter, tuned.prompt_token_ids, images)
    assert tuned.token_ids == expected
    assert peft_greedy(hf, adapter, tuned.prompt_token_ids, images, vision=False) != expected  # the tower's LoRA matters
    assert plain.token_ids == hf_greedy(hf, plain.prompt_token_ids, images)


def test_folder_without_vision_weights_serves_its_text_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The language model's weights saved alone under the image-text config.json: the text model is
    served (transformers' greedy tokens for a text prompt) with one warning, and images are refused."""
    folder, hf = make_qwen3_5_vl(tmp_path / "model")
    weights = folder / "model.safetensors"
    assert not (folder / "model.safetensors.index.json").exists()
    tensors = load_file(str(weights))
    text = {name: t for name, t in tensors.items() if not name.startswith("model.visual.")}
    assert len(text) < len(tensors)
    save_file(text, str(weights), metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="sloth_serve.models.config"):
        llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8)
    warnings = [r.getMessage() for r in caplog.records if "vision-encoder weights" in r.getMessage()]
    assert len(warnings) == 1 and "images are refused" in warnings[0]
    model = llm.engine.runner.model
    assert type(model) is Qwen3_5ForCausalLM and model.config.vision_config is None and llm.vision is None
    out = llm.generate(chat(llm, 0, "No picture here."), GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, [])
    with pytest.raises(ValueError, match="takes text only"):
        llm.generate({"prompt": chat(llm, 1, "What is this?"), "images": [random_image(1)]}, GREEDY)
