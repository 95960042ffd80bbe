"""`sloth-serve`: flags -> Config -> the FastAPI app under uvicorn. With no --model it serves the
embedded demo model."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from server import __version__
from server.config import Config
from server.loader import DEMO_MODEL
from server.loader.chat_template import check_folder_template, resolve_template_flag
from server.logs import PROBE_PATHS

EXAMPLES = """examples:
  sloth-serve                                     # the embedded demo model on 127.0.0.1:8000
  sloth-serve --model ./Llama-3.2-1B-Instruct --lora sql=./adapters/sql --api-key "$KEY"
  sloth-serve --model ./model --lora-dir ./adapters --host 0.0.0.0 --log-format json
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sql", "messages": [{"role": "user", "content": "Hi"}]}'
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, unless the help already says it or there is none
    worth showing (unset, off, empty); the examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or (isinstance(default, list | tuple) and not default)):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one JSON record when --log-format json is asked for."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            from server.startup import startup_error_line

            print(startup_error_line(message, "json"), file=sys.stderr, flush=True)
            sys.exit(2)
        super().error(message)


def parse_lora(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora takes NAME=PATH, got {value!r}")
    return name, path


def build_parser() -> Parser:
    d = Config()
    p = Parser(prog="sloth-serve", description="OpenAI-compatible server for Unsloth fine-tuned models.",
               formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"sloth-serve {__version__}", help="print the version and exit")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=str(DEMO_MODEL), metavar="FOLDER",
                   help="Hugging Face model folder (config.json + *.safetensors, 16-bit or bitsandbytes 4-bit), "
                        "or a PEFT LoRA adapter folder whose base is on disk (default: the embedded demo model)")
    m.add_argument("--served-model-name", default=None, help="name clients use in `model` (default: folder name)")
    m.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="activations and 16-bit weights; auto: bfloat16 on CUDA, float32 on CPU")
    m.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    m.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                   help="longest prompt + completion served (default: the model's max_position_embeddings)")
    m.add_argument("--seed", type=int, default=d.seed, help="seed of requests that set none")
    m.add_argument("--load-format", default=d.load_format, choices=["unsloth", "safetensors"],
                   help="unsloth: 4-bit through Unsloth (default); safetensors: the checkpoint's 16-bit weights")
    m.add_argument("--merge-lora", default=None, metavar="PATH", help="merge this LoRA adapter into the base at load")
    m.add_argument("--chat-template", default=None, metavar="FILE|JINJA",
                   help="the base model's chat template: a file, or the Jinja text itself (default: the tokenizer's); "
                        "adapters whose folder holds a template of their own keep theirs")
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences in one engine step at most")
    e.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens in one engine step at most (longer prompts are prefilled in chunks)")
    e.add_argument("--block-size", type=int, default=d.block_size, choices=[8, 16, 32, 64, 128],
                   help="tokens per KV-cache block")
    e.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV-cache blocks (default: sized from --kv-cache-memory-gb or --gpu-memory-utilization)")
    e.add_argument("--kv-cache-memory-gb", type=float, default=d.kv_cache_memory_gb,
                   help="CPU: memory for the KV cache, in GB")
    e.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="CUDA: share of the GPU's memory the weights, activations and KV cache may take")
    e.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    e.add_argument("--enforce-eager", action="store_true", help="CUDA: run decode steps without CUDA graphs")
    e.add_argument("--async-scheduling", action="store_true",
                   help="queue each decode step before the host has read the previous step's tokens (it is fed "
                        "them on the device), so the host's scheduling and output work overlaps the GPU; "
                        "steps with new prompts, structured outputs, logprobs, penalties or logit bias run as usual")
    e.add_argument("--sampler", choices=["torch", "triton"], default="torch",
                   help="CUDA: sampling by PyTorch ops (default) or by the Triton kernel (no sort; checked against "
                        "torch at startup; slower than torch where top-k / top-p are set)")
    e.add_argument("--no-warmup", action="store_true",
                   help="CUDA: skip compiling the prefill kernels at startup (first requests then compile them)")
    e.add_argument("--cuda-graph-sizes", type=lambda v: tuple(int(x) for x in v.split(",")), default=(),
                   metavar="SIZES",
                   help="decode batch sizes to capture, comma-separated (default 1,2,4,8,16,32,...)")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora", action="append", type=parse_lora, default=[], metavar="NAME=PATH",
                    help="serve a PEFT LoRA adapter as model NAME (repeatable)")
    lo.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                    help="serve every adapter folder in DIR by its folder name, loaded on first use (repeatable)")
    lo.add_argument("--max-cpu-loras", type=int, default=d.max_cpu_loras,
                    help="adapters from --lora-dir kept loaded; the least recently used go beyond")
    lo.add_argument("--allow-runtime-lora", action="store_true",
                    help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (paths under --lora-dir)")
    lo.add_argument("--max-loras", type=int, default=d.max_loras, help="adapters in one engine step at most")
    lo.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank,
                    help="rank of the adapter slots (default: the largest rank among the adapters given at "
                         "start-up, at least 16; adapters loaded later may not exceed it)")
    h = p.add_argument_group("HTTP server")
    h.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface)")
    h.add_argument("--port", type=int, default=d.port, help="TCP port to listen on")
    h.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeatable; default: $SLOTH_API_KEY)")
    h.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests in flight before new ones get 503 + Retry-After (each prompt of a request "
                        "counted once per choice; a request over N alone gets 400)")
    h.add_argument("--max-queued-tokens", type=int, default=None, metavar="N",
                   help="prompt tokens of the requests in flight before new ones get 503 + Retry-After "
                        "(each prompt counted once per choice; a request over N alone gets 400; "
                        "default: twice the KV cache's tokens; 0: unlimited)")
    h.add_argument("--request-timeout", type=float, default=0, metavar="SECONDS",
                   help="stop a generation request this long after its arrival, queue time included: 408, "
                        "or an error event in a stream; a request's `timeout` field may shorten it (0: none)")
    h.add_argument("--max-request-bytes", type=int, default=None, metavar="BYTES",
                   help="larger bodies get 413 (default: what a prompt as long as the context allows needs, "
                        "at most 16 MiB)")
    h.add_argument("--header-timeout", type=float, default=d.header_timeout, metavar="SECONDS",
                   help="close connections that have not sent a request's headers within this time")
    h.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout, metavar="SECONDS",
                   help="close keep-alive connections idle this long")
    h.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests (CORS) from ORIGIN (repeatable; * for any)")
    h.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout, metavar="SECONDS",
                   help="on SIGTERM, seconds to let in-flight requests finish before exiting")
    g = p.add_argument_group("logging")
    g.add_argument("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"],
                   help="least severe level logged; debug adds tracebacks to start-up errors")
    g.add_argument("--log-format", default=d.log_format, choices=["text", "json"],
                   help="json: one JSON object a line, library output (Unsloth, warnings) included")
    g.add_argument("--disable-uvicorn-access-log", "--disable-access-log", dest="disable_access_log",
                   action="store_true", help="no line per HTTP request")
    g.add_argument("--disable-access-log-for-endpoints", default=",".join(PROBE_PATHS), metavar="PATHS",
                   help="comma-separated paths left out of the access log ('' logs every path)")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="no line per finished generation request (id, tokens, latency)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    if args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be at least 1; got {args.max_queued_requests}")
    if args.request_timeout < 0:
        raise ValueError(f"--request-timeout must be >= 0 (0: none); got {args.request_timeout}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535]; got {args.port}")
    api_keys = args.api_key or [k for k in os.environ.get("SLOTH_API_KEY", "").split(",") if k]
    # Templates are compiled now: a broken one is one line here, not a failed load or a 500 later.
    chat_template = resolve_template_flag(args.chat_template) if args.chat_template is not None else None
    check_folder_template(Path(args.model).expanduser(), "--model")
    for name, path in args.lora:
        check_folder_template(Path(path).expanduser(), f"--lora {name}")
    return Config(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        seed=args.seed,
        load_format=args.load_format,
        merge_lora=args.merge_lora,
        chat_template=chat_template,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
        warmup=not args.no_warmup,
        sampler=args.sampler,
        async_scheduling=args.async_scheduling,
        cuda_graph_sizes=args.cuda_graph_sizes,
        lora_dirs=tuple(args.lora_dir),
        max_cpu_loras=args.max_cpu_loras,
        allow_runtime_lora=args.allow_runtime_lora,
        lora_modules=tuple(args.lora),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        host=args.host,
        port=args.port,
        api_key=tuple(api_keys),
        max_queued_requests=args.max_queued_requests,
        max_queued_tokens=args.max_queued_tokens,
        request_timeout=args.request_timeout or None,
        log_level=args.log_level,
        log_format=args.log_format,
        access_log=not args.disable_access_log,
        access_log_skip_paths=tuple(p for p in args.disable_access_log_for_endpoints.split(",") if p),
        log_requests=not args.disable_log_requests,
        max_request_bytes=args.max_request_bytes,
        header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        allowed_origins=tuple(args.allowed_origins),
        shutdown_timeout=args.shutdown_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    parser.json_errors = "--log-format=json" in words or any(
        pair == ("--log-format", "json") for pair in itertools.pairwise(words))
    args = parser.parse_args(words)
    from server.startup import report_startup_error, serve  # light: torch comes after the checks

    try:
        config = config_from_args(args)
    except ValueError as exc:
        return report_startup_error(exc, args.log_level, args.log_format)
    try:
        return serve(config)
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signals (importing torch)
        return 130


if __name__ == "__main__":
    sys.exit(main())
