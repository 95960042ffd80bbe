"""Every setting of sloth-serve in one frozen dataclass; each field declares its command-line flag.

Adding a setting takes one field here and nothing else:

    max_widgets: int = setting(4, "widgets per step at most", "engine")

The flag (--max-widgets), its help, its default in --help, the int conversion and the Config
value all come from it; server/cli.py generates the parser from these fields. The third argument
is the --help section (one of flags.GROUPS; add a section there). Options of
setting() (server/flags.py): `names` for other flag names or aliases (a bool field's flag flips
its default: `names=("--no-warmup",)`), `choices`, `metavar`, `parse` for a word that is not a plain
int/float/str (flags.int_list, flags.word_list, flags.seconds), `repeat` for a repeatable flag
collected into a tuple, `env` for an environment variable used when the flag is absent, `resolve`
for work done once at start-up (reading a file). Checks go in _check_* below, run by
__post_init__ for the CLI and for Config(...) in code alike; `choices` are checked there for you.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import flags
from .flags import setting
from .loader import DEMO_MODEL
from .loader.chat_template import resolve_template_flag
from .logs import PROBE_PATHS

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# Output formats (server/api/output_reader.py), vLLM's names; "auto": read from the chat template.
REASONING_PARSERS = ("auto", "none", "qwen3", "deepseek_r1", "gpt_oss", "harmony")
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral", "harmony", "openai")


@dataclass(frozen=True, slots=True)
class Config:
    # Model
    model: str = setting(
        str(DEMO_MODEL), "Hugging Face model folder (config.json + *.safetensors, 16-bit or bitsandbytes "
        "4-bit), or a PEFT LoRA adapter folder whose base is on disk (default: the embedded demo model)",
        "model", metavar="FOLDER")
    served_model_name: str | None = setting(None, "name clients use in `model` (default: folder name)", "model")
    dtype: str = setting("auto", "activations and 16-bit weights; auto: bfloat16 on CUDA, float32 on CPU",
                         "model", choices=DTYPES)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", "model")
    max_model_len: int | None = setting(
        None, "longest prompt + completion served (default: the model's max_position_embeddings)", "model",
        metavar="TOKENS")
    seed: int = setting(0, "seed of requests that set none", "model")
    # unsloth: FastLanguageModel.from_pretrained(load_in_4bit=True) + for_inference, weights adopted
    # in 4-bit; safetensors: the checkpoint's own 16-bit weights read directly (no quantization)
    load_format: str = setting(
        "unsloth", "unsloth: 4-bit through Unsloth (default); safetensors: the checkpoint's 16-bit weights",
        "model", choices=("unsloth", "safetensors"))
    merge_lora: str | None = setting(None, "merge this LoRA adapter into the base at load", "model", metavar="PATH")
    # Config holds the Jinja text (the flag's file read, or the inline text); adapters whose folder has
    # no template of their own use it too. None: the tokenizer's.
    chat_template: str | None = setting(
        None, "the base model's chat template: a file, or the Jinja text itself (default: the tokenizer's); "
        "adapters whose folder holds a template of their own keep theirs", "model", metavar="FILE|JINJA",
        resolve=resolve_template_flag)
    # How the model writes reasoning and tool calls, which the API splits into reasoning_content and
    # tool_calls. auto: from the chat template (<think>: qwen3; <|channel|>: harmony; <tool_call>,
    # <|python_tag|> or [TOOL_CALLS] for tools).
    reasoning_parser: str = setting(
        "auto", "reasoning format: qwen3 (<think>...</think>), deepseek_r1 (output starts in the reasoning), "
        "gpt_oss / harmony (analysis channel), none (all content); auto: from the chat template", "model",
        choices=REASONING_PARSERS)
    tool_call_parser: str = setting(
        "auto", "tool-call format of tool_choice auto: hermes (<tool_call>), llama3_json (<|python_tag|> and bare "
        "JSON), mistral ([TOOL_CALLS]), harmony / openai (gpt-oss); auto: from the chat template", "model",
        choices=TOOL_CALL_PARSERS)
    # Engine
    max_num_seqs: int = setting(64, "sequences in one engine step at most", "engine")
    max_num_batched_tokens: int = setting(
        2048, "tokens in one engine step at most (longer prompts are prefilled in chunks)", "engine")
    # Every decoding stream waits for its step: a 2,048-token prompt chunk beside 16 decoding streams
    # made their inter-token p99 61 ms (8B, H200), chunks of 448 in the 512-token graph 25.5 ms.
    max_prefill_tokens_while_decoding: int | None = setting(
        None, "prompt tokens in one engine step at most while some sequence decodes (bounds the pause a long "
        "prompt puts into running streams; steps without decodes, or with more requests waiting for their prompts "
        "than streams decoding, take --max-num-batched-tokens); default: the "
        "prefill CUDA-graph size of 384 tokens less --max-num-seqs, at least half of it, so that such a step "
        "replays a graph", "engine", metavar="N")
    block_size: int = setting(16, "tokens per KV-cache block", "engine", choices=(8, 16, 32, 64, 128))
    num_kv_blocks: int | None = setting(
        None, "KV-cache blocks (default: sized from --kv-cache-memory-gb or --gpu-memory-utilization)", "engine")
    kv_cache_memory_gb: float = setting(1.0, "CPU: memory for the KV cache, in GB", "engine")
    gpu_memory_utilization: float = setting(
        0.90, "CUDA: share of the GPU's memory the weights, activations and KV cache may take", "engine")
    enable_prefix_caching: bool = setting(True, "disable prefix caching", "engine", names=("--no-prefix-caching",))
    enforce_eager: bool = setting(False, "CUDA: run every step without CUDA graphs", "engine")
    # LLMEngine: decode step N+1 is queued before step N's tokens are read.
    async_scheduling: bool = setting(
        False, "queue each decode step before the host has read the previous step's tokens (it is fed them "
        "on the device), so the host's scheduling and output work overlaps the GPU; steps with new prompts, "
        "structured outputs, logprobs, penalties or logit bias run as usual", "engine")
    sampler: str = setting(
        "torch", "CUDA: sampling by PyTorch ops (default) or by the Triton kernel (no sort; checked against "
        "torch at startup; slower than torch where top-k / top-p are set)", "engine", choices=("torch", "triton"))
    # process: the engine (GPU owner) in its own process, so the HTTP front end never shares its GIL;
    # thread: the engine in a thread of the server's process (the fallback; the offline LLM's way)
    engine_mode: str = setting(
        "process", "process: the engine in its own process, behind a ZeroMQ socket (the HTTP side never shares "
        "its GIL); thread: in a thread of the server's process", "engine", choices=("process", "thread"))
    warmup: bool = setting(  # LLMEngine.warmup
        True, "CUDA: skip compiling the prefill kernels at startup (first requests then compile them)",
        "engine", names=("--no-warmup",))
    # server/compile_cache.py: Triton's, TorchInductor's and Unsloth's caches under one root, kept
    # across restarts (a volume in a container) so a warm start compiles nothing.
    compile_cache_dir: str | None = setting(
        None, "keep compiled kernels (Triton, TorchInductor, Unsloth) under DIR across restarts (default: "
        "$TRITON_CACHE_DIR etc. where set, else $XDG_CACHE_HOME/sloth-serve or ~/.cache/sloth-serve)", "engine",
        metavar="DIR", env="SLOTH_COMPILE_CACHE_DIR")
    # server/precompile.py: an init container's or an image build's step, with the serving flags.
    precompile_only: bool = setting(
        False, "load the model, compile the kernels the warmup meets (with the --lora adapters' too) into the "
        "compile cache, and exit 0; give the flags the server runs with (shapes decide the kernels). On the CPU "
        "there is nothing to compile: it says so and exits 0", "engine")
    cuda_graph_sizes: tuple[int, ...] = setting(
        (), "decode batch sizes to capture, comma-separated (default 1,2,4,8,16,32,...)", "engine",
        metavar="SIZES", parse=flags.int_list)
    # Prompt steps replayed from CUDA graphs per token-count bucket (server/engine/prefill_graphs.py).
    prefill_cuda_graph_sizes: tuple[int, ...] = setting(
        (), "CUDA: token counts of prompt steps to capture, comma-separated (default "
        "16,32,64,128,256,384,512,768,1024 up to --max-num-batched-tokens; 0: none); larger steps, and some "
        "models' (recurrent layers, images, experts), run eagerly", "engine", metavar="SIZES", parse=flags.int_list)
    # Speculative decoding (server/engine/spec_decode): greedy output is unchanged token for token,
    # sampled output keeps its distribution (rejection sampling). --speculative-model alone means draft.
    speculative_method: str | None = setting(
        None, "propose tokens and verify them in one step of the model: ngram looks the last tokens up in "
        "the prompt and output, draft runs --speculative-model (default: off; draft with --speculative-model)",
        "engine", choices=("ngram", "draft"))
    speculative_model: str | None = setting(
        None, "draft model folder with the model's tokenizer (4-bit or 16-bit, as --load-format loads it)",
        "engine", metavar="FOLDER")
    num_speculative_tokens: int = setting(4, "speculative decoding: tokens proposed per step and sequence",
                                          "engine", metavar="K")
    # A verify step of 1 + k tokens per sequence stops being almost free once the batch is large
    # (bench/spec_decode.py measures where on a GPU).
    speculative_max_batch_size: int = setting(
        8, "speculative decoding: no sequence speculates in steps with more running sequences than this",
        "engine", metavar="N")
    prompt_lookup_min: int = setting(1, "ngram: shortest run of last tokens looked up", "engine", metavar="N")
    prompt_lookup_max: int = setting(
        4, "ngram: longest run of last tokens looked up (the longest run found proposes)", "engine", metavar="N")
    # LoRA
    lora_modules: tuple[tuple[str, str], ...] = setting(
        (), "serve a PEFT LoRA adapter as model NAME (repeatable)", "LoRA", names=("--lora",),
        metavar="NAME=PATH", parse=flags.lora_pair, repeat=True)
    lora_dirs: tuple[str, ...] = setting(
        (), "serve every adapter folder in DIR by its folder name, loaded on first use (repeatable)", "LoRA",
        names=("--lora-dir",), metavar="DIR", repeat=True)
    max_cpu_loras: int = setting(16, "adapters from --lora-dir kept loaded; the least recently used go beyond",
                                 "LoRA")
    allow_runtime_lora: bool = setting(
        False, "enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (paths under --lora-dir)", "LoRA")
    max_loras: int = setting(4, "adapters in one engine step at most", "LoRA")
    # "Given at start-up": --lora, the folders in --lora-dir, --merge-lora. Slots wider than their
    # adapters cost time: rank-16 adapters in rank-64 slots made a batch-64 8B step 10.7 instead of
    # 9.0 ms (H200).
    max_lora_rank: int | None = setting(
        None, "rank of the adapter slots (default: the largest rank among the adapters given at start-up, at "
        "least 16; adapters loaded later may not exceed it)", "LoRA")
    # The NF4 decode GEMV computing each row's LoRA in the same launch (sloth_kernels.triton_nf4_lora)
    # instead of the NF4 product, a shrink and an expand apart; off until measured on the H200
    # (bench/lora_fused.py).
    fused_lora: bool = setting(
        False, "CUDA: 4-bit layers compute the adapters' LoRA inside their NF4 product on batches of up to 64 "
        "rows (one launch per projection instead of three; experimental)", "LoRA")
    # HTTP server
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)", "HTTP server")
    port: int = setting(8000, "TCP port to listen on", "HTTP server")
    # server/api_servers.py: N front-end processes accept on one listening socket and share the one
    # engine process, so the HTTP side's Python work spreads over N cores.
    api_server_count: int = setting(
        1, "HTTP front-end processes sharing the port and the one engine process (more: the HTTP side's "
        "per-token work on more cores; --max-queued-requests and --max-queued-tokens then hold per process)",
        "HTTP server", metavar="N")
    api_key: tuple[str, ...] = setting(
        (), "require 'Authorization: Bearer KEY' (repeatable; default: $SLOTH_API_KEY, comma-separated)",
        "HTTP server", metavar="KEY", repeat=True, env="SLOTH_API_KEY")
    max_queued_requests: int = setting(
        1024, "requests in flight before new ones get 503 + Retry-After (each prompt of a request counted "
        "once per choice; a request over N alone gets 400)", "HTTP server")
    # None: twice the KV cache's tokens (server/api/admission.py, set once the cache is sized).
    max_queued_tokens: int | None = setting(
        None, "prompt tokens of the requests in flight before new ones get 503 + Retry-After (each prompt "
        "counted once per choice; a request over N alone gets 400; default: twice the KV cache's tokens; "
        "0: unlimited)", "HTTP server", metavar="N")
    # Past it the engine request is aborted. None: no limit.
    request_timeout: float | None = setting(
        None, "stop a generation request this long after its arrival, queue time included: 408, or an "
        "error event in a stream; a request's `timeout` field may shorten it (0: none)", "HTTP server",
        metavar="SECONDS", parse=flags.seconds)
    # None: derived once the model is loaded (server/api/limits.py).
    max_request_bytes: int | None = setting(
        None, "larger bodies get 413 (default: what a prompt as long as the context allows needs, at most "
        "16 MiB)", "HTTP server", metavar="BYTES")
    header_timeout: float = setting(
        10.0, "close connections that have not sent a request's headers within this time", "HTTP server",
        metavar="SECONDS")
    keep_alive_timeout: float = setting(5.0, "close keep-alive connections idle this long", "HTTP server",
                                        metavar="SECONDS")
    allowed_origins: tuple[str, ...] = setting(
        (), "allow browser requests (CORS) from ORIGIN (repeatable; * for any)", "HTTP server",
        metavar="ORIGIN", repeat=True)
    shutdown_timeout: float = setting(
        30.0, "on SIGTERM, seconds to let in-flight requests finish before exiting", "HTTP server",
        metavar="SECONDS")
    # Image-text models (server/vision_processor.py, server/api/images.py): checked before anything
    # reaches the engine; a request over a limit is a 400 naming the image.
    limit_mm_per_prompt: int = setting(8, "image-text models: images in one request at most", "HTTP server",
                                       metavar="N")
    max_image_pixels: int = setting(
        4096 * 4096, "image-text models: pixels of one image (width x height, before the processor resizes "
        "it) at most", "HTTP server", metavar="PIXELS")
    max_image_bytes: int = setting(20 * 2**20, "image-text models: bytes of one encoded image at most",
                                   "HTTP server", metavar="BYTES")
    # Empty: only inline (data:) images. Redirects are followed only to listed domains too.
    allowed_media_domains: tuple[str, ...] = setting(
        (), "image-text models: fetch http(s) image URLs from DOMAIN and its subdomains (repeatable; default: "
        "none, images must be inline base64 data URLs)", "HTTP server", metavar="DOMAIN", repeat=True)
    media_fetch_timeout: float = setting(10.0, "image-text models: seconds to fetch one image URL at most",
                                         "HTTP server", metavar="SECONDS")
    # Logging
    log_level: str = setting("info", "least severe level logged; debug adds tracebacks to start-up errors",
                             "logging", choices=LOG_LEVELS)
    log_format: str = setting("text", "json: one JSON object a line, library output (Unsloth, warnings) "
                              "included", "logging", choices=("text", "json"))
    access_log: bool = setting(True, "no line per HTTP request", "logging",
                               names=("--disable-uvicorn-access-log", "--disable-access-log"))
    access_log_skip_paths: tuple[str, ...] = setting(  # probes
        PROBE_PATHS, "comma-separated paths left out of the access log ('' logs every path)", "logging",
        names=("--disable-access-log-for-endpoints",), metavar="PATHS", parse=flags.word_list)
    log_requests: bool = setting(  # server/logs.py
        True, "no line per finished generation request (id, tokens, latency)", "logging",
        names=("--disable-log-requests",))

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_engine(self)
        _check_speculative(self)
        _check_http(self)


def _flag(name: str) -> str:
    return flags.flag_name(Config, name)


def _check_choices(config: Config) -> None:
    for field in dataclasses.fields(config):
        choices = flags.flag_of(field).choices
        value = getattr(config, field.name)
        if choices is not None and value not in choices and value is not None:  # None: unset
            listed = ", ".join(str(c) for c in choices)
            raise ValueError(f"{flags.flag_names(field)[0]} must be one of {listed}; got {value!r}")


def _at_least(config: Config, name: str, low: int, note: str = "") -> None:
    value = getattr(config, name)
    if value is not None and value < low:
        raise ValueError(f"{_flag(name)} must be at least {low}{note}; got {value}")


def _check_engine(config: Config) -> None:
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_while_decoding", "max_loras",
                 "max_lora_rank", "max_cpu_loras"):
        _at_least(config, name, 1)
    _at_least(config, "max_model_len", 2)
    if config.precompile_only and not config.warmup:
        raise ValueError("--precompile-only compiles what the warmup runs: leave out --no-warmup")
    if any(t < 0 or t == 1 for t in config.prefill_cuda_graph_sizes):
        raise ValueError(f"--prefill-cuda-graph-sizes takes token counts of at least 2 (or 0: none); "
                         f"got {','.join(map(str, config.prefill_cuda_graph_sizes))}")
    if not 0 < config.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1]; got {config.gpu_memory_utilization}")
    if not 0 <= config.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63 - 1]; got {config.seed}")


def _check_speculative(config: Config) -> None:
    if config.speculative_method == "draft" and not config.speculative_model:
        raise ValueError("--speculative-method draft needs --speculative-model FOLDER (the draft model)")
    for name in ("num_speculative_tokens", "speculative_max_batch_size", "prompt_lookup_min"):
        _at_least(config, name, 1)
    if config.prompt_lookup_max < config.prompt_lookup_min:
        raise ValueError(f"--prompt-lookup-max must be at least --prompt-lookup-min ({config.prompt_lookup_min}); "
                         f"got {config.prompt_lookup_max}")


def _check_http(config: Config) -> None:
    if not 0 <= config.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535]; got {config.port}")
    if any(not key or key != key.strip() for key in config.api_key):
        raise ValueError("--api-key / $SLOTH_API_KEY: a key is empty or has spaces around it (an unset "
                         "variable?); leave the flag out to serve without keys")
    _at_least(config, "max_queued_requests", 1)
    _at_least(config, "max_queued_tokens", 0, " (0: unlimited)")
    _at_least(config, "max_request_bytes", 1)
    for name in ("limit_mm_per_prompt", "max_image_pixels", "max_image_bytes"):
        _at_least(config, name, 1)
    for name in ("header_timeout", "keep_alive_timeout", "media_fetch_timeout"):
        if not flags.is_seconds(getattr(config, name)):
            raise ValueError(f"{_flag(name)} must be a positive number of seconds; got {getattr(config, name)}")
    if config.request_timeout is not None and not flags.is_seconds(config.request_timeout):
        raise ValueError(f"--request-timeout must be a positive number of seconds (or 0: none); "
                         f"got {config.request_timeout}")
    _at_least(config, "api_server_count", 1)
    if config.api_server_count > 1 and config.engine_mode != "process":
        raise ValueError("--api-server-count above 1 needs the engine in its own process: leave out "
                         "--engine-mode thread")
    if config.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0; got {config.shutdown_timeout}")


def fit_max_model_len(max_model_len: int, num_blocks: int, block_size: int, explicit: bool,
                      cache_hint: str) -> int:
    """The max_model_len to serve with a KV cache of `num_blocks` blocks of `block_size` tokens (the
    blocks the block manager hands out: its scratch block is not among them). One the cache holds
    is kept. One it does not hold: an error if `explicit` (--max-model-len given, as vLLM refuses
    to start), else (the model's default) lowered to the cache's tokens, which the caller logs.
    `cache_hint`: how to give the cache more room (the flag that sized it)."""
    num_cache_tokens = num_blocks * block_size
    if max_model_len <= num_cache_tokens:
        return max_model_len
    if explicit:
        raise ValueError(
            f"--max-model-len {max_model_len} is larger than the {num_cache_tokens} tokens the KV cache can hold "
            f"({num_blocks} blocks of {block_size}): a sequence that long could never run; lower --max-model-len "
            f"to {num_cache_tokens} or less, or give the KV cache more room ({cache_hint})")
    return num_cache_tokens


def more_blocks_hint(max_model_len: int, block_size: int) -> str:
    """What --num-kv-blocks holds a sequence of max_model_len tokens."""
    return f"raise --num-kv-blocks to at least {-(-max_model_len // block_size)}"
