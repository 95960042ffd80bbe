"""Offline throughput of the engine alone (no HTTP): B requests of a fixed prompt length decoding a
fixed number of tokens (EOS ignored), optionally spread over LoRA adapters.

    python bench/engine.py --model DIR --batch-sizes 1,8,64 --input-len 64 --output-len 128 \\
        [--lora ADAPTER_DIR ...] --out results.md
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from sloth_kernels.nf4 import quantize_nf4_ref
from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader.checkpoint import LoadedModel
from sloth_serve.loader.peft import LoRAWeights, load_lora, startup_lora_rank
from sloth_serve.models.config import ModelConfig
from sloth_serve.models.weights import build_model

SHAPES = {  # random-weight stand-ins for real checkpoints: no download, no disk
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        rope_theta=500000.0, tie_word_embeddings=True),
}


def random_nf4_model(shape: str, device: torch.device) -> LoadedModel:
    """A model of a real shape with random weights, every projection quantized to NF4 on the device
    (the bytes bitsandbytes would produce), embeddings and norms in bf16."""
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, **SHAPES[shape]})
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=gen, device=device, dtype=torch.bfloat16) * 0.02

    def weights():  # type: ignore[no-untyped-def]
        h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        yield "model.embed_tokens.weight", rand(cfg.vocab_size, h)
        yield "model.norm.weight", torch.ones(h, device=device, dtype=torch.bfloat16)
        if not cfg.tie_word_embeddings:
            yield "lm_head.weight", rand(cfg.vocab_size, h)
        shapes = {"self_attn.q_proj": (cfg.num_heads * d, h), "self_attn.k_proj": (cfg.num_kv_heads * d, h),
                  "self_attn.v_proj": (cfg.num_kv_heads * d, h), "self_attn.o_proj": (h, cfg.num_heads * d),
                  "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
        for layer in range(cfg.num_layers):
            prefix = f"model.layers.{layer}."
            yield prefix + "input_layernorm.weight", torch.ones(h, device=device, dtype=torch.bfloat16)
            yield prefix + "post_attention_layernorm.weight", torch.ones(h, device=device, dtype=torch.bfloat16)
            for name, dims in shapes.items():
                yield prefix + name + ".weight", quantize_nf4_ref(rand(*dims))

    model = build_model(cfg, weights(), torch.bfloat16, device)
    return LoadedModel(model, Path("random-" + shape), frozenset({1}))


def random_lora(engine: LLMEngine, name: str, rank: int, seed: int) -> LoRAWeights:
    """A rank-`rank` adapter on every projection with nonzero A and B (made on the host, like a load)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, layer in engine.loaded.model.lora_layers().items():
        for index, out in enumerate(layer.out_slices):
            a = torch.randn(rank, layer.in_features, generator=gen) * 0.01
            b = torch.randn(out, rank, generator=gen) * 0.01
            tensors[(module, index)] = (a, b)
    return LoRAWeights(name, "random", rank, None, tensors)


def run_batch(engine: LLMEngine, batch: int, input_len: int, output_len: int, num_adapters: int,
              rng: random.Random, tag: str) -> dict[str, float]:
    vocab = engine.loaded.model.config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for i in range(batch):
        prompt = [rng.randrange(100, vocab) for _ in range(input_len)]
        adapter = (i % num_adapters) + 1 if num_adapters else 0
        engine.add_request(f"{tag}-{i}", prompt, params, adapter)
    first_token_at: float | None = None
    steps = 0
    while engine.has_unfinished_requests:
        outs = engine.step()
        steps += 1
        if first_token_at is None and sum(1 for o in outs if o.new_token_ids) == batch:
            first_token_at = time.perf_counter()  # every request has its first token: decode from here
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    decode_s = end - (first_token_at or start)
    return {
        "batch": batch,
        "adapters": num_adapters,
        "total_s": end - start,
        "steps": steps,
        "output_tok_s": batch * output_len / (end - start),
        "decode_tok_s": batch * (output_len - 1) / decode_s if decode_s > 0 else float("nan"),
        "ms_per_decode_step": 1000 * decode_s / max(output_len - 1, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (or use --random-shape)")
    ap.add_argument("--random-shape", choices=sorted(SHAPES), help="random NF4 weights of a real shape, made on the GPU")
    ap.add_argument("--load-format", default="unsloth", choices=["unsloth", "safetensors"])
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--lora", nargs="*", default=[], help="adapter folders; requests go round-robin over them")
    ap.add_argument("--random-loras", type=int, default=0, help="this many random rank-16 adapters instead")
    ap.add_argument("--max-lora-rank", type=int, default=None,
                    help="adapter slot rank (default: the server's, the widest --lora adapter, at least 16)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--fused-lora", action="store_true", help="the LoRA inside the NF4 GEMV (the server's --fused-lora)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    t0 = time.perf_counter()
    loaded = random_nf4_model(args.random_shape, torch.device("cuda")) if args.random_shape else None
    engine = LLMEngine(Config(
        model=args.model or "", load_format=args.load_format, max_model_len=args.max_model_len, device="cuda" if args.random_shape else "auto",
        max_num_seqs=max(sizes), max_num_batched_tokens=max(2048, args.input_len * max(sizes)),
        enforce_eager=args.enforce_eager, fused_lora=args.fused_lora, max_loras=max(len(args.lora), args.random_loras, 1),
        max_lora_rank=args.max_lora_rank or startup_lora_rank([Path(f) for f in args.lora]),  # as the server sizes slots
    ), loaded)
    for i, folder in enumerate(args.lora, start=1):
        engine.add_lora(i, load_lora(f"lora{i}", folder, engine.config.max_lora_rank))
    for i in range(1, args.random_loras + 1):
        engine.add_lora(i, random_lora(engine, f"lora{i}", 16, i))
    num_loras = len(args.lora) or args.random_loras
    load_s = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**30 if engine.device.type == "cuda" else 0.0
    rng = random.Random(0)
    rows = []
    run_batch(engine, 2, args.input_len, 8, 0, rng, "warmup")
    for adapters in ([0, num_loras] if num_loras else [0]):
        for b in sizes:
            best = max((run_batch(engine, b, args.input_len, args.output_len, adapters, rng, f"b{b}a{adapters}r{r}")
                        for r in range(args.repeats)), key=lambda r: r["output_tok_s"])
            rows.append(best)
            print(json.dumps(best), flush=True)
    lines = [
        f"engine: {args.random_shape or args.model} ({'random NF4' if args.random_shape else args.load_format}), load + graph capture {load_s:.1f}s, peak GPU memory {mem:.1f} GiB",
        f"prompt {args.input_len} tokens, {args.output_len} new tokens, greedy, EOS ignored, best of {args.repeats}",
        "",
        "| batch | adapters | output tok/s | decode tok/s | ms / decode step | total s |",
        "|---|---|---|---|---|---|",
        *[f"| {r['batch']} | {r['adapters']} | {r['output_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
          f"{r['ms_per_decode_step']:.2f} | {r['total_s']:.2f} |" for r in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
