"""`sloth-serve`: flags -> Config -> the FastAPI app under uvicorn. With no --model it serves the
embedded demo model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from server import __version__
from server.config import Config
from server.loader import DEMO_MODEL


def parse_lora(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora takes NAME=PATH, got {value!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="sloth-serve", description="OpenAI-compatible server for Unsloth fine-tuned models."
    )
    p.add_argument("--version", action="version", version=f"sloth-serve {__version__}")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=str(DEMO_MODEL), help="model folder (default: the embedded demo model)")
    m.add_argument("--served-model-name", default=None, help="name clients use in `model` (default: folder name)")
    m.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    m.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    m.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    m.add_argument("--seed", type=int, default=d.seed)
    m.add_argument("--load-format", default=d.load_format, choices=["unsloth", "safetensors"],
                   help="unsloth: 4-bit through Unsloth (default); safetensors: the checkpoint's 16-bit weights")
    m.add_argument("--merge-lora", default=None, metavar="PATH", help="merge this LoRA adapter into the base at load")
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    e.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    e.add_argument("--block-size", type=int, default=d.block_size)
    e.add_argument("--num-kv-blocks", type=int, default=None, help="default: sized from memory")
    e.add_argument("--kv-cache-memory-gb", type=float, default=d.kv_cache_memory_gb, help="CPU only")
    e.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    e.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora", action="append", type=parse_lora, default=[], metavar="NAME=PATH",
                    help="serve a PEFT LoRA adapter as model NAME (repeatable)")
    lo.add_argument("--max-loras", type=int, default=d.max_loras)
    lo.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    h = p.add_argument_group("HTTP server")
    h.add_argument("--host", default=d.host)
    h.add_argument("--port", type=int, default=d.port)
    h.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' (repeatable; default: $SLOTH_API_KEY)")
    h.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests in flight before new ones get 503 + Retry-After")
    h.add_argument("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    if args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be at least 1; got {args.max_queued_requests}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535]; got {args.port}")
    api_keys = args.api_key or [k for k in os.environ.get("SLOTH_API_KEY", "").split(",") if k]
    return Config(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        seed=args.seed,
        load_format=args.load_format,
        merge_lora=args.merge_lora,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        lora_modules=tuple(args.lora),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        host=args.host,
        port=args.port,
        api_key=tuple(api_keys),
        max_queued_requests=args.max_queued_requests,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn  # late: `--help` stays fast

    from server.api import create_app

    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=5)
    )
    state = app.state.server
    state.on_fatal = lambda: setattr(server, "should_exit", True)  # a failed load stops the server
    server.run()
    return 1 if state.load_error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
