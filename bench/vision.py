"""Image-text serving on a real-shape random Qwen2.5-VL-7B: time to first token with one 1024x1024
image on an idle engine, and output tokens/s with 1 / 8 / 32 concurrent image requests, for
sloth-serve's engine (offline LLM, 4-bit through Unsloth) and for Unsloth's own FastVisionModel
(`for_inference` + `generate`, batched). Each side runs in its own process (Unsloth patches
transformers on import); one JSON line per measurement, then a markdown table.

    python bench/vision.py --folder /tmp/qwen-vl-7b --out $OUT/vision.md          # all steps
    python bench/vision.py --folder /tmp/qwen-vl-7b --step make                     # the folder only
    python bench/vision.py --folder /tmp/tiny-vl --tiny --side ours --device cpu    # smoke test

The folder holds random 16-bit weights (written once on the device, ~16 GB), the word tokenizer
with Qwen's vision tokens, a vision chat template and Qwen2.5-VL's published image processor
settings; both sides quantize it to NF4 at load (bitsandbytes, through Unsloth)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import append_jsonl, now_iso, read_jsonl

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTION = "Describe this picture in detail, with every object, colour and position you can see."
# Qwen/Qwen2.5-VL-7B-Instruct's config.json (text and vision) and preprocessor_config.json.
TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
               tie_word_embeddings=False)
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, window_size=112, out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31],
                 tokens_per_second=2)
PROCESSOR_7B = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056)
TINY = (dict(TEXT_7B, vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 3, 3]}),
        dict(VISION_7B, depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
             fullatt_block_indexes=[1]))


def make_folder(folder: Path, tiny: bool, device: str) -> None:
    """Random 16-bit Qwen2.5-VL weights, the tokenizer, template and image processor, in `folder`."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from bench.random_tokenizer import write_word_tokenizer

    text, vision = TINY if tiny else (TEXT_7B, VISION_7B)
    folder.mkdir(parents=True, exist_ok=True)
    write_word_tokenizer(folder, int(text["vocab_size"]) - len(VISION_TOKENS), 131072)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    start, pad, end = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    cfg = Qwen2_5_VLConfig(text_config=dict(text, eos_token_id=2, bos_token_id=1, pad_token_id=0), vision_config=vision,
                           image_token_id=pad, vision_start_token_id=start, vision_end_token_id=end,
                           video_token_id=int(text["vocab_size"]) + 1, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # N(0, 0.02) everywhere but norms: logits spread like a trained model's
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    Qwen2VLImageProcessorPil(**PROCESSOR_7B).save_pretrained(folder)


def image(seed: int, size: int) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------- ours (sloth-serve's engine)


def run_ours(args: argparse.Namespace) -> list[dict[str, Any]]:
    from sloth_serve.engine.sampling_params import SamplingParams
    from sloth_serve.llm import LLM

    llm = LLM(args.folder, load_format=args.load_format, device=args.device, max_num_seqs=max(args.streams))
    text = str(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], tokenize=False,
        add_generation_prompt=True))
    rows = []
    first = SamplingParams(max_tokens=1, temperature=0)
    for i in range(args.repeats + 1):  # a new image each time: nothing cached; the first run warms up
        start = time.perf_counter()
        out = llm.generate({"prompt": text, "images": [image(1000 + i, args.image_size)]}, first)[0]
        ttft = time.perf_counter() - start
        if i:
            rows.append(dict(side="ours", metric="ttft_s", value=ttft, prompt_tokens=len(out.prompt_token_ids)))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    for n in args.streams:
        # images never seen before: neither the encoder cache nor the prefix cache helps
        prompts: list[Any] = [{"prompt": text, "images": [image(10_000 * n + i, args.image_size)]} for i in range(n)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outs)
        rows.append(dict(side="ours", metric="output_tok_s", streams=n, value=tokens / seconds, seconds=seconds))
    return rows


# ---------------------------------------------------------------- Unsloth FastVisionModel


def run_unsloth(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from unsloth import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(str(args.folder), load_in_4bit=True, local_files_only=True)
    FastVisionModel.for_inference(model)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = getattr(processor, "tokenizer", processor)
    pixels_of = Qwen2VLImageProcessorPil.from_pretrained(str(args.folder))
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": QUESTION}]}], tokenize=False, add_generation_prompt=True)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def inputs(images: list[Any]) -> dict[str, Any]:
        batch = pixels_of(images=images, return_tensors="pt")
        n = int(batch["image_grid_thw"][0].prod()) // 4
        ids = tokenizer.encode(text.replace("<|image_pad|>", "<|image_pad|>" * n), add_special_tokens=False)
        input_ids = torch.tensor([ids] * len(images))
        return dict(input_ids=input_ids.cuda(), attention_mask=torch.ones_like(input_ids).cuda(),
                    pixel_values=batch["pixel_values"].cuda(), image_grid_thw=batch["image_grid_thw"].cuda(),
                    mm_token_type_ids=(input_ids == pad).int().cuda())

    def generate(images: list[Any], new_tokens: int) -> float:
        # From the images as a client sends them, preprocessing included, as on our side (the offline
        # LLM preprocesses inside generate): on 2026-12-05 this side's 226 ms TTFT left it out.
        torch.cuda.synchronize()
        start = time.perf_counter()
        kw = inputs(images)
        model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = []
    for i in range(args.repeats + 1):
        seconds = generate([image(1000 + i, args.image_size)], 1)
        if i:
            rows.append(dict(side="unsloth", metric="ttft_s", value=seconds))
    for n in args.streams:
        try:
            seconds = generate([image(10_000 * n + i, args.image_size) for i in range(n)], args.new_tokens)
        except torch.OutOfMemoryError:
            rows.append(dict(side="unsloth", metric="output_tok_s", streams=n, value=None, note="out of memory"))
            torch.cuda.empty_cache()
            continue
        rows.append(dict(side="unsloth", metric="output_tok_s", streams=n, value=n * args.new_tokens / seconds,
                         seconds=seconds))
    return rows


# ---------------------------------------------------------------- driver


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def cell(side: str, metric: str, streams: int | None = None) -> str:
        vals = [r["value"] for r in rows if r["side"] == side and r["metric"] == metric
                and r.get("streams") == streams and r["value"] is not None]
        if not vals:
            return "-"
        v = sorted(vals)[len(vals) // 2]
        return f"{v * 1000:.0f} ms" if metric == "ttft_s" else f"{v:,.0f}"

    head = f"| peer | TTFT, one {args.image_size}x{args.image_size} image | " + " | ".join(
        f"tok/s, {n} stream{'s' * (n > 1)}" for n in args.streams) + " |"
    lines = [f"# Qwen2.5-VL-7B shape, random weights, NF4 ({now_iso()})", "",
             f"{args.new_tokens} new tokens a request; one {args.image_size}x{args.image_size} image and "
             f"{len(QUESTION.split())} words of question per request.", "", head,
             "|" + "---|" * (2 + len(args.streams))]
    for side, label in (("ours", "sloth-serve (offline LLM)"), ("unsloth", "Unsloth FastVisionModel + for_inference")):
        lines.append(f"| {label} | {cell(side, 'ttft_s')} | "
                     + " | ".join(cell(side, "output_tok_s", n) for n in args.streams) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--step", choices=("all", "make", "measure"), default="all")
    p.add_argument("--side", choices=("ours", "unsloth"), help="measure one side in this process")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--load-format", default="unsloth")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("vision.md"))
    args = p.parse_args(argv)
    jsonl = args.out.with_suffix(".jsonl")
    if args.side is not None:
        for row in (run_ours if args.side == "ours" else run_unsloth)(args):
            append_jsonl(jsonl, row)
            print(json.dumps(row), flush=True)
        return 0
    if args.step in ("all", "make") and not (args.folder / "config.json").is_file():
        make_folder(args.folder, args.tiny, args.device)
    if args.step == "make":
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--step" and a not in ("all", "measure")]
    for side in ("ours", "unsloth"):
        code = subprocess.run([sys.executable, __file__, *passed, "--side", side], env=env).returncode
        if code:
            print(f"{side}: exited {code}", file=sys.stderr)
    args.out.write_text(markdown(read_jsonl(jsonl), args))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
