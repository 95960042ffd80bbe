"""The engine: add requests, abort them, and step. Each step is schedule -> run -> postprocess."""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from sloth_kernels.lora import MAX_TRITON_RANK
from sloth_kernels.rope_scaling import long_prompt_threshold

from ..config import Config, fit_max_model_len, more_blocks_hint
from ..loader.checkpoint import LoadedModel, load_checkpoint, resolve_device, resolve_dtype
from ..loader.peft import LoRAWeights, startup_lora_rank
from ..models.layers import use_fused_lora
from ..models.moe import expert_modules
from ..models.tower_lora import vision_lora_layers
from ..startup_clock import Phase, current, startup_phase
from . import stalls
from .block_manager import BlockManager
from .cross_kv import CROSS_KV_IMAGES, CrossKVBudget
from .cuda_graphs import default_buckets
from .failures import SequenceError, describe, is_device_fault, is_out_of_memory
from .graph_memory import graph_pool_bytes
from .lora_manager import LoRAManager
from .mm_inputs import MultiModalInputs, check_images
from .model_runner import LaunchedDecode, ModelRunner
from .outputs import RequestOutput
from .prefill_graphs import default_prefill_buckets, prefill_bound_while_decoding
from .request_fit import out_of_vocab
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from .sequence import FinishReason, Sequence, TokenLogprob
from .spec_decode.draft import DraftRunner
from .spec_decode.setup import (
    build_spec_decoder,
    load_draft_model,
    spec_graph_rows,
    spec_method,
)
from .state_cache import StateSlots
from .state_snapshots import StateSnapshots
from .vision_inputs import ENCODER_CACHE_BYTES

__all__ = ["LLMEngine", "RequestOutput", "StepObserver", "check_params"]

logger = logging.getLogger(__name__)


# Prompt lengths the warmup runs: odd and multiple-of-16 sizes in each NF4 product regime
# (GEMV up to 64 rows, fused GEMM up to 255, decode-to-scratch + cuBLAS from 256).
# Prefix caching for models with recurrent layers: state snapshots kept (each as large as a running
# sequence's state: about 50 MB at Qwen3.5-9B's shape).
MAX_STATE_SNAPSHOTS = 16

WARMUP_PROMPT_LENS = (5, 16, 100, 160, 300, 512, 700)


class StepObserver(Protocol):
    """Receives each step's figures (the Prometheus metrics implement it; the engine knows no more)."""

    def on_step(
        self, scheduler: Scheduler, batch: ScheduledBatch | None, outputs: list[RequestOutput],
        forward_seconds: float | None, now: float,
    ) -> None: ...


def startup_adapter_folders(config: Config) -> list[Path]:
    """Every adapter folder the configuration names at start-up: --lora, each folder inside a
    --lora-dir, --merge-lora, and the model folder itself when it is an adapter."""
    folders = [Path(path) for _, path in config.lora_modules]
    for root in map(Path, config.lora_dirs):
        if root.is_dir():
            folders += sorted(p for p in root.iterdir() if p.is_dir())
    if config.merge_lora:
        folders.append(Path(config.merge_lora))
    if config.model:
        folders.append(Path(config.model).expanduser())
    return [f for f in folders if (f / "adapter_config.json").is_file()]


class LLMEngine:
    def __init__(self, config: Config, loaded: LoadedModel | None = None) -> None:
        if config.max_lora_rank is None:  # slots as wide as the widest adapter known now, no wider
            config = replace(config, max_lora_rank=startup_lora_rank(startup_adapter_folders(config)))
            logger.info("adapter slots of rank %d (the widest adapter named at start-up, at least 16; "
                        "--max-lora-rank sets it)", config.max_lora_rank)
        assert config.max_lora_rank is not None  # for mypy: given, or set just above
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        clock_mark = current().mark()
        # load_checkpoint times its own phases: reading, and converting to our layers
        self.loaded = loaded or load_checkpoint(
            config.model, self.dtype, self.device, config.load_format, config.max_model_len or 2048,
            config.merge_lora, config.max_lora_rank,
        )
        model = self.loaded.model
        self.eos_token_ids = self.loaded.eos_token_ids
        self.max_model_len = min(config.max_model_len or model.config.max_position_embeddings,
                                 model.config.max_position_embeddings)
        if config.max_model_len is not None and config.max_model_len > self.max_model_len:
            logger.warning("--max-model-len %d is past the model's %d positions (max_position_embeddings): "
                           "serving %d", config.max_model_len, self.max_model_len, self.max_model_len)
        if model.config.has_state and spec_method(config) is not None:
            raise ValueError(f"speculative decoding cannot serve {model.config.family}: its recurrent layers' state "
                             f"cannot be rolled back past rejected draft tokens; leave out --speculative-method / "
                             f"--speculative-model")
        self.draft_model = load_draft_model(config, model, self.dtype, self.device)  # timed as the model's load
        if self.draft_model is not None and self.draft_model.config.has_state:
            raise ValueError(f"--speculative-model is a {self.draft_model.config.family} model, whose recurrent layers' "
                             f"state the draft runner does not keep: use a draft of attention layers only")
        # Recurrent layers: a state slot per running sequence (and one for the engine's probe step);
        # with prefix caching, rows for state snapshots too (server/engine/state_snapshots.py).
        num_state_slots = config.max_num_seqs + 1 if model.config.has_state else 0
        caching = self._prefix_caching(model)
        num_snapshots = min(config.max_num_seqs, MAX_STATE_SNAPSHOTS) if caching and num_state_slots else 0
        buckets = prefill_buckets = None
        if not config.enforce_eager and getattr(model, "supports_cuda_graphs", True):  # generic path: eager (not Qwen-VL)
            # Verify steps replay them too, with 1 + k rows per speculating sequence.
            buckets = list(config.cuda_graph_sizes) or default_buckets(max(config.max_num_seqs, spec_graph_rows(config)))
            prefill_buckets = [t for t in config.prefill_cuda_graph_sizes if t > 0] if config.prefill_cuda_graph_sizes \
                else default_prefill_buckets(config.max_num_batched_tokens)
        cross_kv = self._cross_kv_budget(model)
        num_blocks = self._num_kv_blocks(model, num_state_slots + num_snapshots, buckets, prefill_buckets,
                                         cross_kv.num_bytes if cross_kv else 0)
        self.max_model_len = self._fit_max_model_len(num_blocks)  # before anything is sized by it
        self.block_manager = BlockManager(num_blocks, config.block_size, caching,
                                          long_prompt_threshold(model.config.rope_scaling),
                                          StateSlots(num_state_slots) if num_state_slots else None)
        self.block_manager.cross_kv = cross_kv
        if num_snapshots:  # rows after the running slots and the scratch row
            self.block_manager.snapshots = StateSnapshots(num_state_slots + 1, num_snapshots, config.block_size)
        sched_cfg = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_tokens_while_decoding=prefill_bound_while_decoding(
                config.max_prefill_tokens_while_decoding, config.max_num_seqs),
            max_model_len=self.max_model_len,
            max_loras=config.max_loras,
            whole_images=getattr(model, "bidirectional_images", False),
        )
        self.scheduler = Scheduler(sched_cfg, self.block_manager)
        self.lora_manager = LoRAManager(
            model.lora_layers(), config.max_loras, config.max_lora_rank, self.dtype, self.device,
            expert_modules(model), vision_lora_layers(model),
        )
        use_fused_lora(model, config.fused_lora)
        with startup_phase(f"allocate the KV cache ({num_blocks} blocks)"):
            self.runner = ModelRunner(
                model, num_blocks, config.block_size, self.device, self.dtype, self.lora_manager,
                self.max_model_len, buckets, num_state_slots, num_snapshots, prefill_buckets, config.max_num_seqs,
            )
        self.runner.sampler.use_triton = config.sampler == "triton"
        self.spec = build_spec_decoder(config, self.block_manager, self.max_model_len, self.draft_model,
                                       self.dtype, self.device)
        self.scheduler.spec_stats.enabled = self.spec is not None
        self.seqs: dict[str, Sequence] = {}
        self.pending: list[RequestOutput] = []  # outputs of aborts, sent with the next step
        self.observer: StepObserver | None = None
        self.adapters_to_remove: set[int] = set()
        self.defer_observation = False  # step() keeps its observer record for observe_deferred()
        self._inflight: LaunchedDecode | None = None  # async scheduling: a decode step not read yet
        self._unobserved: list[tuple[ScheduledBatch | None, list[RequestOutput], float | None, float]] = []
        captures = self.runner.graphs is not None or self.runner.prefill_graphs is not None
        with startup_phase("capture CUDA graphs", "graphs", log=captures):
            self.runner.capture_graphs()
        if config.warmup and self.device.type == "cuda":
            try:
                with startup_phase("warmup: prefill and sampling kernels compiled or read from the cache", "warmup"):
                    self.warmup()
            except Exception as exc:  # the same path every request takes: better to stop here, saying so
                raise RuntimeError(f"engine warmup failed ({type(exc).__name__}: {exc}); requests would fail the "
                                   "same way (--no-warmup skips the warmup)") from exc
        if self.device.type == "cuda" and stalls.watch_compiles():
            stalls.serving()  # from here a kernel compile stalls requests: each one is logged
        # What this start-up timed here (the engine process sends them to the front end's summary).
        self.startup_phases: tuple[Phase, ...] = current().since(clock_mark)
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
                    self.loaded.folder, self.device, self.dtype, num_blocks, config.block_size, self.max_model_len)

    def warmup(self, adapter_id: int = 0) -> float:
        """Run prompts of each shape class once, alone and then together (a mixed step), so that the
        eager prefill kernels are compiled before the first request rather than during it (Triton
        specializes on sizes of 1 and multiples of 16; the NF4 product changes kernel at 65 and 256
        rows; the multi-LoRA kernels' tiling at 16, 32 and 64 tokens and their K split with the
        number of token tiles). With `adapter_id` every prompt uses that adapter (add_lora runs
        this once, for the first). Nothing of it stays: prefix caching is off meanwhile and the
        sequences are freed."""
        start = time.perf_counter()
        rng = random.Random(0)
        vocab = self.loaded.model.config.vocab_size
        bm = self.block_manager
        lens = [n for n in WARMUP_PROMPT_LENS if n + 2 <= min(self.max_model_len, self.config.max_num_batched_tokens)
                and bm.num_blocks_for(n + 2) <= bm.num_blocks]
        greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        # Together: sampled with every cut-off (with --sampler triton, this compiles and checks its kernel).
        sampled = SamplingParams(max_tokens=2, temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, ignore_eos=True)
        caching, self.block_manager.enable_prefix_caching = self.block_manager.enable_prefix_caching, False
        # Eagerly: the prompt steps' graphs were compiled when captured, but a step outside them (a
        # larger one, prompt logprobs) runs the eager kernels, which should not compile while serving.
        prefill_graphs, self.runner.prefill_graphs = self.runner.prefill_graphs, None

        def add(name: str, n: int, params: SamplingParams) -> None:
            self.add_request(f"warmup-{name}", [rng.randrange(vocab) for _ in range(n)], params, adapter_id)

        def finish() -> None:
            while self.has_unfinished_requests:
                self.step()

        if self.device.type == "cuda" and not adapter_id:
            # Every attention tile the dispatcher can pick, whatever the mix of decodes and prompts:
            # the prompts below reach only some (a mixed step with 17-32 decodes met a new one live).
            from sloth_kernels.triton_attention import compile_variants

            cfg = self.loaded.model.config
            sinks = torch.zeros(cfg.num_heads, device=self.device) if cfg.attn_sinks else None  # gpt-oss
            # One cache of each shape (Gemma 4's sliding and full layers differ in head dim and KV heads)
            by_shape = {k.shape: (k, v) for k, v in self.runner.kv_caches}
            for (k_cache, v_cache), (window, softcap) in itertools.product(by_shape.values(), cfg.attention_variants):
                compile_variants(cfg.num_heads, k_cache, v_cache, self.runner.scratch_block, self.max_model_len,
                                 window, softcap, sinks, getattr(self.loaded.model, "bidirectional_images", False))
        try:
            for group, params in [([n], greedy) for n in lens] + [(lens, sampled)]:
                for i, n in enumerate(group):
                    add(f"{len(group)}-{i}", n, params)
                finish()
            # Prompts arriving while others decode: under load nearly every prefill shares its step
            # with decodes, and those steps take other kernel variants (seen on the H200: a 1.8 s
            # first-token time for the first request that arrived during decoding).
            # One prompt at a time, each until its prompt is computed: the steps hold no more prompts
            # than decodes, so the scheduler bounds their prompt tokens as under steady load. With
            # --max-num-seqs 1 no prompt ever shares a step with a decode: nothing to compile. A wait
            # ends with the decoding request too (a prompt that fits the cache only alone waits for
            # it), which could otherwise decode up to max_model_len first.
            if self.config.max_num_seqs > 1:
                add("decoding", 3, SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True))
                self.step()
                for i, n in enumerate(lens):
                    add(f"mixed-{i}", n, greedy)
                    self.step()
                    while ((mixed := self.seqs.get(f"warmup-mixed-{i}")) is not None and not mixed.num_output_tokens
                           and "warmup-decoding" in self.seqs):
                        self.step()
                self.abort("warmup-decoding")
                finish()
            # A burst: as many 64-token prompts as one step's token budget takes (the first wave of
            # 64 concurrent requests compiled kernels for that size on the H200: a 1 s first token).
            n = 64
            full = min(self.config.max_num_batched_tokens // n, self.config.max_num_seqs,
                       bm.num_blocks // bm.num_blocks_for(n + 2))
            if n + 2 <= self.max_model_len and full > 1:
                for i in range(full):
                    add(f"full-{i}", n, greedy)
                finish()
        finally:
            self.block_manager.enable_prefix_caching = caching
            self.runner.prefill_graphs = prefill_graphs
        return time.perf_counter() - start

    def _prefix_caching(self, model: torch.nn.Module) -> bool:
        if self.config.enable_prefix_caching and model.config.has_state:  # type: ignore[union-attr]
            if hasattr(model, "state_tensors"):
                logger.info("prefix caching: a hit restores the recurrent layers' state snapshotted where the "
                            "cached prompt's last full block ended (up to %d snapshots kept)",
                            min(self.config.max_num_seqs, MAX_STATE_SNAPSHOTS))
                return True
            logger.info("prefix caching is off for this model: its recurrent layers' state is not snapshotted at "
                        "block boundaries yet, so a cached prefix could not restore it")
            return False
        return self.config.enable_prefix_caching

    def _cross_kv_budget(self, model: torch.nn.Module) -> CrossKVBudget | None:
        """Models whose images enter through cross-attention layers: room for the keys and values of
        CROSS_KV_IMAGES images (or of one prompt at --limit-mm-per-prompt), taken from the KV cache's
        memory (sloth_serve.engine.cross_kv)."""
        bytes_per_image = getattr(model, "cross_kv_bytes_per_image", None)
        if bytes_per_image is None:
            return None
        per_image = int(bytes_per_image(self.dtype))
        num_images = max(CROSS_KV_IMAGES, self.config.limit_mm_per_prompt)
        logger.info("cross-attention keys and values: room for %d images' (%.2f GiB), beside the KV cache",
                    num_images, num_images * per_image / 2**30)
        return CrossKVBudget(num_images * per_image, per_image)

    def _num_kv_blocks(self, model: torch.nn.Module, num_state_slots: int, buckets: list[int] | None = None,
                       prefill_buckets: list[int] | None = None, cross_kv_bytes: int = 0) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = ModelRunner.kv_bytes_per_block(model, cfg.block_size, self.dtype)  # type: ignore[arg-type]
        if self.draft_model is not None:  # the draft's cache has a block for every one of the model's
            per_block += DraftRunner.kv_bytes_per_block(self.draft_model, cfg.block_size, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - cfg.gpu_memory_utilization) * total
            budget -= self._graph_pool_bytes(model, buckets, prefill_buckets)  # captured after the cache
            budget -= self._lora_slot_bytes(model)  # made with the first adapter, after the cache
            budget -= self._expert_lora_bytes(model)  # made with the first adapter training experts
            # An image-text model's encoder cache fills up after the KV cache is allocated, on the same
            # device (on the CPU, --kv-cache-memory-gb is the KV cache's own memory, beside it).
            budget -= ENCODER_CACHE_BYTES if getattr(model, "is_vision", False) else 0
        else:
            budget = cfg.kv_cache_memory_gb * 2**30
        budget -= ModelRunner.state_bytes(model, num_state_slots, self.dtype)  # type: ignore[arg-type]
        budget -= cross_kv_bytes
        return max(int(budget // per_block), 1)

    def _fit_max_model_len(self, num_blocks: int) -> int:
        """max_model_len within the KV cache of `num_blocks` (config.fit_max_model_len): a sequence
        that long must fit the cache alone, or a long generation would be cut off where it outgrew it.
        An explicit --max-model-len above it stops the start-up; the model's default is lowered to it."""
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            hint = more_blocks_hint(self.max_model_len, cfg.block_size)
        elif self.device.type == "cuda":
            hint = f"raise --gpu-memory-utilization (now {cfg.gpu_memory_utilization:g})"
        else:
            hint = f"raise --kv-cache-memory-gb (now {cfg.kv_cache_memory_gb:g})"
        fitted = fit_max_model_len(self.max_model_len, num_blocks, cfg.block_size, cfg.max_model_len is not None, hint)
        if fitted < self.max_model_len:
            logger.warning("max_model_len lowered from %d (the model's max_position_embeddings) to %d, the tokens the "
                           "KV cache can hold (%d blocks of %d): longer requests are refused; for the model's whole "
                           "context, %s", self.max_model_len, fitted, num_blocks, cfg.block_size, hint)
        return fitted

    def _graph_pool_bytes(self, model: torch.nn.Module, buckets: list[int] | None,
                          prefill_buckets: list[int] | None) -> int:
        """What the CUDA graphs' pool is expected to take (graph_memory.py), logged when set aside."""
        cfg = self.config
        prefill = ModelRunner.prefill_graph_buckets(model, prefill_buckets, cfg.max_num_seqs,  # type: ignore[arg-type]
                                                    self.max_model_len, self.device)
        decode = buckets if self.device.type == "cuda" else None
        lora = bool(model.lora_layers()) and cfg.max_loras > 0  # type: ignore[operator]
        assert cfg.max_lora_rank is not None
        size = graph_pool_bytes(model.config, torch.empty((), dtype=self.dtype).element_size(),  # type: ignore[arg-type]
                                decode or [], prefill, cfg.max_num_seqs, lora, cfg.max_lora_rank > MAX_TRITON_RANK)
        if size:
            logger.info("%.2f GiB set aside for the CUDA graphs' memory pool (decode batches %s, prompt steps "
                        "of %s tokens%s), before sizing the KV cache", size / 2**30, decode, prefill,
                        ", with and without LoRA" if lora else "")
        return size

    def _lora_slot_bytes(self, model: torch.nn.Module) -> int:
        """The adapter slots' bytes (LoRAManager.slot_bytes), where the model takes adapters."""
        cfg = self.config
        assert cfg.max_lora_rank is not None
        layers = model.lora_layers().values() if cfg.max_loras > 0 else []  # type: ignore[operator]
        size = LoRAManager.slot_bytes(layers, cfg.max_loras, cfg.max_lora_rank,
                                      torch.empty((), dtype=self.dtype).element_size())
        if size:
            logger.info("%.2f GiB set aside for %d adapter slots of rank %d (made with the first adapter), before "
                        "sizing the KV cache", size / 2**30, cfg.max_loras, cfg.max_lora_rank)
        return size

    def _expert_lora_bytes(self, model: torch.nn.Module) -> int:
        """The MoE experts' LoRA tables' bytes (LoRAManager.expert_table_bytes), where the model has
        experts modules (every one takes LoRA)."""
        cfg = self.config
        assert cfg.max_lora_rank is not None
        experts = expert_modules(model).values() if cfg.max_loras > 0 else []
        size = LoRAManager.expert_table_bytes(experts, cfg.max_loras, cfg.max_lora_rank,
                                              torch.empty((), dtype=self.dtype).element_size())
        if size:
            logger.info("%.2f GiB set aside for the MoE experts' LoRA tables of %d modules, %d slots of rank %d "
                        "(made with the first adapter that trains experts), before sizing the KV cache",
                        size / 2**30, len(experts), cfg.max_loras, cfg.max_lora_rank)
        return size

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work or bool(self.pending) or self._inflight is not None

    def add_lora(self, adapter_id: int, weights: LoRAWeights) -> None:
        if adapter_id < 1:
            raise ValueError("adapter ids start at 1 (0 is the base model)")
        had_slots = self.lora_manager.has_slots
        self.runner.slot_modules.check(weights)  # its own embed_tokens / lm_head / norms fit the model
        tables_changed = self.lora_manager.add(adapter_id, weights)
        if not had_slots:
            with stalls.quiet():
                self._first_adapter_loaded(adapter_id, weights)
        elif tables_changed:
            # MoE expert LoRA tables made or widened: the LoRA graphs read the old ones, capture them again.
            with stalls.quiet():
                self.runner.capture_lora_graphs_again()

    def _first_adapter_loaded(self, adapter_id: int, weights: LoRAWeights) -> None:
        # Decode (and prompt) graphs that include the LoRA kernels.
        captures = self.runner.graphs is not None or self.runner.prefill_graphs is not None
        with startup_phase("capture CUDA graphs with the LoRA kernels", "graphs", log=captures):
            self.runner.capture_graphs()
        # The eager steps' LoRA kernels, compiled now rather than during the first requests (on
        # the H200, steps of over 1 s under load with adapters); only while nothing else runs.
        if self.config.warmup and self.device.type == "cuda" and not self.has_unfinished_requests:
            observer, self.observer = self.observer, None  # warmup requests are not traffic
            try:
                with startup_phase(f"warmup with adapter {weights.name}: LoRA kernels compiled or read from the "
                                   "cache", "warmup"):
                    self.warmup(adapter_id)
            finally:
                self.observer = observer

    def remove_lora(self, adapter_id: int) -> None:
        """Unload an adapter once no request uses it: running requests finish on its weights."""
        self.adapters_to_remove.add(adapter_id)
        self._remove_unused_adapters()

    def _remove_unused_adapters(self) -> None:
        if not self.adapters_to_remove:
            return
        in_use = {seq.adapter_id for seq in self.seqs.values()}
        for adapter_id in self.adapters_to_remove - in_use:
            self.lora_manager.remove(adapter_id)
            if self.runner.vision is not None:  # its images' encodings with its vision LoRA
                self.runner.vision.forget_adapter(adapter_id)
            self.adapters_to_remove.discard(adapter_id)

    def vocab_size(self, adapter_id: int = 0) -> int:
        """Token ids valid for the base (0) or an adapter: more for an adapter trained with added tokens."""
        return self.runner.vocab_size(adapter_id)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: int = 0,
        eos_token_ids: frozenset[int] | None = None, mm: MultiModalInputs | None = None,
        system_prompt_end: int = 0,
    ) -> None:
        """`eos_token_ids`: the request's own (an adapter trained with another EOS); None: the model's.
        `mm`: the prompt's images, whose placeholder tokens it holds (image-text models).
        `system_prompt_end`: where the prompt's system part ends (a chat's first user turn starts; 0:
        unknown), a point where models with recurrent layers snapshot their state for later prompts."""
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if adapter_id and adapter_id not in self.lora_manager.adapters:
            raise ValueError(f"adapter id {adapter_id} is not loaded")
        vocab = self.vocab_size(adapter_id)
        # an image's placeholder may lie past the logits' vocabulary (Llama 3.2 Vision's <|image|>)
        image_token = getattr(self.loaded.model, "image_token_id", None) if mm is not None else None
        bad = out_of_vocab((t for t in prompt_token_ids if t != image_token), vocab)
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:3]}")
        check_params(params, vocab)
        eos = self.eos_token_ids if eos_token_ids is None else eos_token_ids
        if mm is not None:
            check_images(self.loaded.model, mm, prompt_token_ids)
        if not 0 <= system_prompt_end <= len(prompt_token_ids):
            raise ValueError(f"system_prompt_end must be in [0, {len(prompt_token_ids)}] (the prompt's length); "
                             f"got {system_prompt_end}")
        seq = Sequence(request_id, list(prompt_token_ids), params, adapter_id, eos, mm=mm,
                       system_prompt_end=system_prompt_end)
        self.scheduler.add(seq)
        self.seqs[request_id] = seq

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        seq = self.scheduler.abort(request_id, reason)
        if seq is None:
            return False
        self._release(seq)
        self.pending.append(RequestOutput.of(seq, [], []))
        return True

    def _release(self, seq: Sequence) -> None:
        self.seqs.pop(seq.request_id, None)
        self.runner.sampler.release(seq.request_id)

    def step(self, on_launched: Callable[[], None] | None = None) -> list[RequestOutput]:
        """One engine step. `on_launched` runs exactly once: when the step's GPU work is queued
        (before the wait for its tokens), or at once for a step with nothing to run."""
        outputs, batch = self._step(on_launched)
        self.pending = []
        if self.observer is not None:
            record = (batch, outputs, self.runner.last_forward_seconds, time.monotonic())
            if self.defer_observation:
                self._unobserved.append(record)
            else:
                self.observer.on_step(self.scheduler, *record)
        return outputs

    def observe_deferred(self) -> None:
        """Give the observer the steps held back by `defer_observation` (the async engine does so
        once the next step is queued on the GPU, so the metrics' host work overlaps it). Each
        record keeps its step's end time; queue lengths and KV usage are read now, a step late."""
        records, self._unobserved = self._unobserved, []
        if self.observer is not None:
            for record in records:
                self.observer.on_step(self.scheduler, *record)

    def _step(self, on_launched: Callable[[], None] | None) -> tuple[list[RequestOutput], ScheduledBatch | None]:
        outputs = self.pending  # emptied once the step succeeds: a failed step's outputs stay pending
        if self._inflight is not None:
            return self._step_ahead(on_launched, outputs)
        if self.spec is not None:  # draft tokens for the sequences that speculate this step
            self.spec.propose(self.scheduler.running, self.runner.sampler, self.runner.draft_probs)
        batch = self.scheduler.schedule()
        self._copy_states()
        if batch.is_empty:
            if on_launched is not None:
                on_launched()
            outputs.extend(self._drain_finished_waiting())
            return outputs, None
        if self.config.async_scheduling and self._decodes_ahead_ok(batch) and self._launch_ahead(batch):
            # Queued: its tokens are read in the next call, after the step after it (fed them on
            # the device) is queued.
            if on_launched is not None:
                on_launched()
            outputs.extend(self._drain_finished_waiting())
            return outputs, None
        batch, sampled, logprobs = self._run(batch, on_launched, outputs)
        self._postprocess(batch, sampled, logprobs, outputs)
        return outputs, (batch if batch.seqs else None)

    # --- failures: a request's failure ends that request only ------------------------------------
    # The sampler prepares each row's own state (seed, grammar, logit bias) before it draws and
    # names the rows it could not prepare (SequenceError): those requests fail, and the step runs
    # again without them. Any other error of a step is pinned down by running each of its
    # sequences alone. Only a device fault, running out of memory (both for the caller), or a step
    # where even a one-token probe fails is the engine's own error and propagates.

    def _run(self, batch: ScheduledBatch, on_launched: Callable[[], None] | None, outputs: list[RequestOutput],
             ) -> tuple[ScheduledBatch, list[int | None], list[TokenLogprob | None] | None]:
        """Run the step; returns the batch it ran (its failed requests' errors go to `outputs`)."""
        while True:
            try:
                sampled, logprobs = self.runner.run(batch, on_launched)
                return batch, sampled, logprobs
            except SequenceError as exc:
                failures = exc.failures
            except Exception as exc:
                if is_out_of_memory(exc) or is_device_fault(exc):
                    raise
                return self._run_alone(self._rewound(batch), exc, outputs)
            on_launched = None  # ModelRunner.run calls it once, whatever happens
            kept = self._fail_requests(batch, failures, outputs)
            named_none = len(kept.seqs) == len(batch.seqs)
            kept = self._rewound(kept)
            if named_none:  # it named none of them: find them one by one
                return self._run_alone(kept, None, outputs)
            if not kept.seqs:
                return kept, [], None
            batch = kept

    def _rewound(self, batch: ScheduledBatch) -> ScheduledBatch:
        """A model with recurrent layers: the failed forward may have advanced its sequences' states,
        and running them again would advance them twice. Each starts over from its first token (its
        prefill recomputed, as after a preemption); one that no longer fits waits, preempted."""
        if not self.loaded.model.config.has_state:
            return batch
        kept = ScheduledBatch(num_preempted=batch.num_preempted)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            end = seq.num_computed_tokens + n
            self.block_manager.free(seq)  # its blocks and state slot
            seq.num_computed_tokens = 0
            if self.block_manager.allocate_slots(seq, end):
                kept.seqs.append(seq)
                kept.num_new_tokens.append(end)
            else:
                self.scheduler.running.remove(seq)
                self.scheduler._preempt(seq, kept)  # back to the waiting queue's head
        return kept

    def _run_alone(self, batch: ScheduledBatch, error: Exception | None, outputs: list[RequestOutput],
                   ) -> tuple[ScheduledBatch, list[int | None], list[TokenLogprob | None] | None]:
        """After a step failed with `error`, run each of its sequences alone: those that fail alone
        fail, the others keep what they computed."""
        if error is not None:
            logger.error("a step of %d sequences failed; running each alone to find which:\n%s",
                         len(batch.seqs), "".join(traceback.format_exception(error)).rstrip())
        kept = ScheduledBatch(num_preempted=batch.num_preempted)
        sampled: list[int | None] = []
        logprobs: list[TokenLogprob | None] = []
        failures: dict[str, str] = {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            try:
                if error is not None and len(batch.seqs) == 1:
                    raise error  # it ran alone already
                one_sampled, one_logprobs = self.runner.run(ScheduledBatch([seq], [n]))
            except Exception as exc:
                if is_out_of_memory(exc) or is_device_fault(exc):
                    raise
                why = exc.failures.get(seq.request_id) if isinstance(exc, SequenceError) else None
                failures[seq.request_id] = why or describe(exc)
                continue
            kept.seqs.append(seq)
            kept.num_new_tokens.append(n)
            sampled += one_sampled
            logprobs += one_logprobs or [None]
        if error is not None and not kept.seqs:
            self._check_engine_works(error)
        self._fail_requests(batch, failures, outputs)
        return kept, sampled, (logprobs if any(lp is not None for lp in logprobs) else None)

    def _fail_requests(self, batch: ScheduledBatch, failures: dict[str, str],
                       outputs: list[RequestOutput]) -> ScheduledBatch:
        """End the requests of `batch` that `failures` names, each with its error; returns the rest."""
        kept = ScheduledBatch(num_preempted=batch.num_preempted)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            why = failures.get(seq.request_id)
            if why is None:
                kept.seqs.append(seq)
                kept.num_new_tokens.append(n)
                continue
            logger.warning("request %s failed in the engine: %s", seq.request_id, why)
            self.scheduler.abort(seq.request_id, FinishReason.ERROR)
            self._release(seq)
            out = RequestOutput.of(seq, [], [])
            out.error = f"this request failed in the engine (other requests go on): {why}"
            outputs.append(out)
        return kept

    def _check_engine_works(self, error: Exception) -> None:
        """Every sequence of a failed step failed alone too: a one-token probe decides whether the
        engine itself is broken (then `error` is raised) or only those requests were."""
        probe = Sequence("engine-probe", [0], SamplingParams(max_tokens=1, temperature=0.0), 0, self.eos_token_ids)
        if not self.block_manager.allocate_slots(probe, 1):
            return  # no room to try: only the requests are known to have failed
        try:
            self.runner.run(ScheduledBatch([probe], [1]))
        except Exception as exc:
            logger.error("a one-token probe step fails too (%s): the engine cannot go on", describe(exc))
            raise error from exc
        finally:
            self.block_manager.free(probe)
            self.runner.sampler.release(probe.request_id)

    def _launch_ahead(self, batch: ScheduledBatch) -> bool:
        """Queue `batch` without waiting for its tokens (async scheduling). False when a request's
        failure prevented it: the caller then runs the batch as usual, which pins the failure down."""
        try:
            self._inflight = self.runner.launch_decode(batch)
        except Exception as exc:
            if is_out_of_memory(exc) or is_device_fault(exc):
                raise
            logger.info("a decode step could not be queued ahead (%s); running it now", describe(exc))
            return False
        return True

    def _postprocess(self, batch: ScheduledBatch, sampled: list[int | None],
                     logprobs: list[TokenLogprob | None] | None, outputs: list[RequestOutput]) -> None:
        before = {seq.request_id: (seq.num_tokens, len(seq.logprobs)) for seq in batch.seqs}
        for seq in self.scheduler.postprocess(batch, sampled, logprobs):
            num_tokens, num_logprobs = before[seq.request_id]
            # No new token: max_tokens 0, the prompt only scored. Several: accepted draft tokens.
            out = RequestOutput.of(seq, seq.token_ids[num_tokens:], seq.logprobs[num_logprobs:])
            if seq.params.prompt_logprobs is not None and seq.num_output_tokens <= 1:
                out.prompt_logprobs = list(seq.prompt_logprobs)  # a recompute after preemption rewrites it
            outputs.append(out)
            if seq.is_finished:
                self._release(seq)
        outputs.extend(self._drain_finished_waiting())
        self._remove_unused_adapters()

    # --- async scheduling (--async-scheduling) ----------------------------------------------------
    # A decode step P is queued without waiting for its tokens. At the next call, the step after it
    # (C) is queued first, for the same sequences one position further, its input ids taken on the
    # device from P's sampled tokens; only then does the host wait for P's tokens and process them,
    # while the GPU runs C. A sequence that P's token ends (EOS, stop token) has computed one
    # position for nothing in C: its result is dropped, and its KV blocks, freed on the host, are
    # handed out only to steps queued after C. Anything else (new prompts waiting, a sequence
    # needing its host-side history to sample: penalties, grammar, min_tokens; logprobs) ends the
    # run-ahead: P is finished alone and the next step is scheduled as usual.

    @staticmethod
    def _samples_without_history(seq: Sequence) -> bool:
        """Whether the sequence's next token can be sampled before the host saw its previous one."""
        p = seq.params
        return (p.structured is None and p.logprobs is None and not p.logit_bias and not p.has_penalties
                and p.min_tokens <= seq.num_output_tokens)

    def _decodes_ahead_ok(self, batch: ScheduledBatch) -> bool:
        # Every running sequence is in it (a token budget below the number running would leave the
        # others out for as long as steps run ahead), each decoding one token and sampling it (a
        # prompt's last token alone is a prefill: its prompt logprobs are scored on the eager path).
        return len(batch.seqs) == len(self.scheduler.running) and all(n == 1 for n in batch.num_new_tokens) and all(
            batch.samples(i) and self.scheduler._is_decoding(seq) and self._samples_without_history(seq)
            for i, seq in enumerate(batch.seqs))

    def _ahead_batch(self, prev: ScheduledBatch) -> tuple[ScheduledBatch, list[int]] | None:
        """The step after `prev` for its sequences that go on (and their rows in prev), or None."""
        if self.scheduler.could_admit():
            return None  # a waiting prompt (or preempted sequence) can start: schedule it now
        seqs: list[Sequence] = []
        rows: list[int] = []
        for i, seq in enumerate(prev.seqs):
            if seq.is_finished:
                continue  # aborted while its step ran
            if seq.num_output_tokens + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= self.max_model_len:
                continue  # prev's token is its last
            if not self._samples_without_history(seq):
                return None
            seqs.append(seq)
            rows.append(i)
        if not seqs:
            return None
        for seq in seqs:  # room for the position after the one prev computes
            if not self.block_manager.allocate_slots(seq, 2):
                return None
        return ScheduledBatch(seqs, [1] * len(seqs)), rows

    def _step_ahead(self, on_launched: Callable[[], None] | None,
                    outputs: list[RequestOutput]) -> tuple[list[RequestOutput], ScheduledBatch | None]:
        prev = self._inflight
        assert prev is not None
        self._copy_states()
        self._inflight = None
        ahead = self._ahead_batch(prev.batch)
        if ahead is not None:
            try:
                self._inflight = self.runner.launch_decode(ahead[0], prev, ahead[1])
            except Exception as exc:
                if is_out_of_memory(exc) or is_device_fault(exc):
                    raise
                # prev is read as usual; the next step runs without running ahead and pins it down.
                logger.info("a decode step could not be queued ahead (%s)", describe(exc))
        if on_launched is not None:
            on_launched()
        sampled = self.runner.finish_decode(prev)
        live = [i for i, seq in enumerate(prev.batch.seqs) if not seq.is_finished]
        batch = ScheduledBatch([prev.batch.seqs[i] for i in live], [1] * len(live))
        self._postprocess(batch, [sampled[i] for i in live], None, outputs)
        return outputs, prev.batch

    def _copy_states(self) -> None:
        """State snapshots taken by the last step and restored by this schedule, before the forward."""
        if self.block_manager.snapshots is not None and self.block_manager.snapshots.pending:
            self.runner.copy_states(self.block_manager.snapshots.drain())

    def _drain_finished_waiting(self) -> list[RequestOutput]:
        """Sequences the scheduler ended without running them (too large for the whole cache); the
        scheduler lists them, so no step scans every request."""
        done, self.scheduler.finished_unscheduled = self.scheduler.finished_unscheduled, []
        for seq in done:
            self._release(seq)
        return [RequestOutput.of(seq, [], []) for seq in done]

    def fail_running(self, message: str) -> list[RequestOutput]:
        """End the running requests with an error (their step failed); waiting ones stay queued."""
        return self._fail(self.scheduler.finish_running(FinishReason.ERROR), message)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (the engine cannot go on); returns their outputs."""
        return self._fail(self.scheduler.finish_all(FinishReason.ERROR), message)

    def _fail(self, seqs: list[Sequence], message: str) -> list[RequestOutput]:
        self._inflight = None  # whatever it computed is not read
        outputs, self.pending = self.pending, []  # those a failed step had (aborts, failed requests)
        for seq in seqs:
            self._release(seq)
            out = RequestOutput.of(seq, [], [])
            out.error = message
            outputs.append(out)
        return outputs


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """What SamplingParams does not check and a step would fail on (a device-side error on a GPU):
    token ids outside the vocabulary, numbers that are not finite, a seed no generator takes."""
    if params.seed is not None and not 0 <= params.seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64); got {params.seed}")
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if not math.isfinite(getattr(params, name)):
            raise ValueError(f"{name} must be a finite number; got {getattr(params, name)}")
    bad_bias = [t for t, v in params.logit_bias.items() if not 0 <= t < vocab_size or not math.isfinite(v)]
    if bad_bias:
        raise ValueError(f"logit_bias keys must be token ids in [0, {vocab_size}) and its values finite; "
                         f"got {bad_bias[:3]}")
    bad_stops = out_of_vocab(params.stop_token_ids, vocab_size)
    if bad_stops:
        raise ValueError(f"stop_token_ids must be in [0, {vocab_size}); got {bad_stops[:3]}")
