"""Build a random-weight Llama checkpoint of a real shape (bf16 safetensors written shard by shard,
the demo model's tokenizer), and optionally its bitsandbytes NF4 twin and random PEFT LoRA adapters,
so that GPU benchmarks need no model hub.

    python bench/make_random_model.py --shape llama3-8b --out /tmp/m8b --quantize-bnb --lora 8
    # -> /tmp/m8b (bf16), /tmp/m8b-bnb-4bit (pre-quantized), /tmp/m8b-loras/lora-{0..7} (rank 16)

The other families' shapes (bench/family_shapes.py: gemma3-4b, phi4-mini, qwen3-30b-a3b, gpt-oss-20b,
...) are written as pre-quantized NF4 folders directly (bench/nf4_checkpoint.py), in --out:

    python bench/make_random_model.py --shape qwen3-30b-a3b --layers 12 --out /tmp/qwen3moe
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.family_shapes import SHAPES as FAMILY_SHAPES
from bench.family_shapes import hf_config
from bench.nf4_checkpoint import write_nf4_checkpoint
from bench.random_tokenizer import DEMO_TOKENIZER, SPECIAL_TOKENS, write_tokenizer  # noqa: F401 (re-exported)

PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The demo tokenizer's special ids: <|endoftext|> = 0 (eos / pad), <|im_end|> = 2.
EOS_IDS = [2, 0]
PAD_ID = 0


@dataclass(frozen=True, slots=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    max_pos: int
    tie: bool
    rope_theta: float
    rope_factor: float  # llama3 rope scaling factor

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def proj_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each projection of one decoder layer."""
        h, kv, f = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


SHAPES = {
    "llama3-8b": Shape(4096, 32, 14336, 128256, 32, 8, 8192, False, 500000.0, 8.0),
    "llama3.2-1b": Shape(2048, 16, 8192, 128256, 32, 8, 8192, True, 500000.0, 32.0),
    # CPU smoke tests: the demo tokenizer's vocabulary (a 128,256-row one makes CPU `generate` slow).
    "tiny": Shape(128, 2, 256, 4096, 4, 2, 8192, True, 500000.0, 8.0),
}


def module_of(proj: str) -> str:
    return "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint in file order, with its shape."""
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        specs.append((f"{p}.input_layernorm.weight", (shape.hidden,)))
        for proj, dims in shape.proj_shapes().items():
            specs.append((f"{p}.{module_of(proj)}.{proj}.weight", dims))
        specs.append((f"{p}.post_attention_layernorm.weight", (shape.hidden,)))
    specs.append(("model.norm.weight", (shape.hidden,)))
    if not shape.tie:
        specs.append(("lm_head.weight", (shape.vocab, shape.hidden)))
    return specs


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in specs:
        nbytes = 2 * _numel(dims)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def random_tensors(
    specs: list[tuple[str, tuple[int, ...]]], gen: torch.Generator, device: torch.device, std: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """bf16 host tensors: N(0, std) for matrices (drawn on `device`), ones for norms."""
    for name, dims in specs:
        if len(dims) == 1:
            yield name, torch.ones(dims, dtype=torch.bfloat16)
            continue
        t = torch.randn(dims, generator=gen, device=device, dtype=torch.bfloat16).mul_(std)
        yield name, t.cpu()


def write_weights(shape: Shape, out: Path, device: torch.device, seed: int, std: float, shard_gb: float) -> None:
    """One shard in host memory at a time; an index file when there is more than one."""
    shards = plan_shards(tensor_specs(shape), int(shard_gb * 2**30))
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, specs in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = dict(random_tensors(specs, gen, device, std))
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
        print(f"  wrote {fname} ({i + 1}/{len(shards)})", file=sys.stderr, flush=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_config(shape: Shape, out: Path) -> None:
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": shape.rope_theta, "factor": shape.rope_factor,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=shape.max_pos, rms_norm_eps=1e-5,
        rope_parameters=rope, tie_word_embeddings=shape.tie, bos_token_id=None, eos_token_id=EOS_IDS[-1],
        pad_token_id=PAD_ID, architectures=["LlamaForCausalLM"], dtype="bfloat16",
    )
    cfg.save_pretrained(out)
    write_generation_config(out)


def write_generation_config(out: Path) -> None:
    gen = {"bos_token_id": None, "eos_token_id": EOS_IDS, "pad_token_id": PAD_ID, "do_sample": False,
           "max_new_tokens": 256}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def build_family(args: argparse.Namespace, out: Path, device: torch.device) -> int:
    """A family shape: its NF4 folder written directly (no bf16 folder, no adapters)."""
    shape = FAMILY_SHAPES[args.shape]
    cfg = hf_config(shape, args.layers, args.vocab_size)
    # The word tokenizer's special ids (as the Llama shapes): no BOS, <|im_end|> / <|endoftext|> end a turn.
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = None, EOS_IDS[-1], PAD_ID
    start = time.perf_counter()
    layers = f"{cfg.num_hidden_layers} of {shape.layers} layers" if args.layers else f"{shape.layers} layers"
    print(f"{args.shape} ({shape.source}, {layers}) -> {out}", file=sys.stderr, flush=True)
    n_params = write_nf4_checkpoint(cfg, shape.skip_modules, out, device, args.seed, args.std, args.shard_gb,
                                    nf4_experts=args.moe_experts == "nf4")
    write_generation_config(out)
    write_tokenizer(out, cfg.vocab_size, min(cfg.max_position_embeddings, 131072), args.tokenizer)
    print(f"NF4 checkpoint of {n_params / 1e9:.2f}B params written in {time.perf_counter() - start:.1f}s",
          file=sys.stderr, flush=True)
    return 0


def quantize_bnb(src: Path, dst: Path, device: torch.device) -> None:
    """Pre-quantized NF4 folder (double quant, bf16 compute), as Unsloth's `-bnb-4bit` uploads are."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    where: int | str = (device.index or 0) if device.type == "cuda" else str(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(src), quantization_config=bnb, dtype=torch.bfloat16, device_map={"": where},
    )
    model.save_pretrained(str(dst))
    for path in src.iterdir():  # tokenizer files, generation config
        if not path.name.startswith(("model", "config.json")):
            shutil.copy(path, dst / path.name)
    del model


def write_lora(shape: Shape, base: Path, dst: Path, rank: int, alpha: int, seed: int) -> None:
    """A PEFT LoRA adapter on every projection with nonzero A and B: A ~ N(0, 1/in), B ~ N(0, 0.02^2),
    so the low-rank term is a few percent of the base projection (visible, not dominant)."""
    from peft import LoraConfig

    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(shape.layers):
        for proj, (n_out, n_in) in shape.proj_shapes().items():
            key = f"base_model.model.model.layers.{i}.{module_of(proj)}.{proj}"
            a = torch.randn((rank, n_in), generator=gen) / n_in**0.5
            b = torch.randn((n_out, rank), generator=gen) * 0.02
            tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=list(PROJ_NAMES), base_model_name_or_path=str(base.resolve()))
    cfg.inference_mode = True
    cfg.save_pretrained(str(dst))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted([*SHAPES, *FAMILY_SHAPES]), required=True)
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the bf16 checkpoint (a family shape: for its NF4 checkpoint)")
    p.add_argument("--layers", type=int, default=None,
                   help="family shapes: keep only the first N decoder layers (a big MoE measured on fewer layers)")
    p.add_argument("--moe-experts", choices=["nf4", "bf16"], default="nf4",
                   help="MoE family shapes: nf4 writes one 4-bit linear per expert (Unsloth's -bnb-4bit uploads); "
                        "bf16 keeps the experts 16-bit as 3-D tensors (what transformers + bitsandbytes write)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where random numbers are drawn (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="std of the random matrices")
    p.add_argument("--shard-gb", type=float, default=4.0, help="max size of one safetensors shard")
    p.add_argument("--vocab-size", type=int, default=None, help="override the shape's vocabulary size")
    p.add_argument("--tokenizer", choices=["words", "demo"], default="words",
                   help="words: a word-level tokenizer with exactly the model's vocabulary (every id decodes to "
                        "text); demo: the embedded demo model's 4,096-id tokenizer")
    p.add_argument("--quantize-bnb", action="store_true",
                   help="also write <out>-bnb-4bit, pre-quantized NF4 (needs bitsandbytes)")
    p.add_argument("--bnb-out", type=Path, default=None, help="folder for --quantize-bnb (default <out>-bnb-4bit)")
    p.add_argument("--lora", type=int, default=0, metavar="N", help="write N random LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=None, help="default: the rank (scale 1)")
    p.add_argument("--lora-out", type=Path, default=None,
                   help="adapters go to <lora-out>/lora-<i> (default <out>-loras); their base is the NF4 folder "
                        "with --quantize-bnb, else <out>")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = SHAPES.get(args.shape) or SHAPES["tiny"]  # (a family shape goes to build_family below)
    if args.vocab_size:
        shape = replace(shape, vocab=args.vocab_size)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} exists and is not empty; pass --force to overwrite", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        stale.unlink()  # shards of an earlier shape would otherwise mix with the new index
    device = torch.device(args.device)
    if args.shape in FAMILY_SHAPES:
        if args.lora:
            print("error: --lora is for the Llama shapes only", file=sys.stderr)
            return 2
        return build_family(args, out, device)
    if args.layers:
        shape = replace(shape, layers=args.layers)
    start = time.perf_counter()
    n_params = sum(_numel(d) for _, d in tensor_specs(shape))
    print(f"{args.shape}: {n_params / 1e9:.2f}B params -> {out}", file=sys.stderr, flush=True)
    write_weights(shape, out, device, args.seed, args.std, args.shard_gb)
    write_config(shape, out)
    write_tokenizer(out, shape.vocab, shape.max_pos, args.tokenizer)
    print(f"bf16 checkpoint written in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    lora_base = out
    if args.quantize_bnb:
        t = time.perf_counter()
        bnb_out = args.bnb_out or out.with_name(out.name + "-bnb-4bit")
        quantize_bnb(out, bnb_out, device)
        lora_base = bnb_out  # same NF4 weights as quantizing <out> at load, and loads faster
        print(f"NF4 checkpoint {bnb_out} written in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    lora_out = args.lora_out or out.with_name(out.name + "-loras")
    for i in range(args.lora):
        write_lora(shape, lora_base, lora_out / f"lora-{i}", args.lora_rank, args.lora_alpha or args.lora_rank,
                   args.seed + 1000 + i)
    if args.lora:
        print(f"{args.lora} rank-{args.lora_rank} adapters in {lora_out}", file=sys.stderr, flush=True)
    print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
