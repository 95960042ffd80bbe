"""Speculative decoding from the configuration: the draft model loaded (when there is one) and the
SpecDecoder the engine asks for proposals before each step."""

from __future__ import annotations

import logging

import torch

from ...config import Config
from ...loader.checkpoint import load_checkpoint
from ...models.weights import CausalLM
from ..block_manager import BlockManager
from ..cuda_graphs import default_buckets
from .draft import DraftRunner
from .proposer import SpecConfig, SpecDecoder

logger = logging.getLogger(__name__)


def spec_method(config: Config) -> str | None:
    """ngram, draft or None (off); --speculative-model alone means draft."""
    return config.speculative_method or ("draft" if config.speculative_model else None)


def spec_graph_rows(config: Config) -> int:
    """Rows of the largest verify step (0 without speculation): the decode graphs go up to it, so that
    verify steps replay a graph even where --max-num-seqs is small."""
    if spec_method(config) is None:
        return 0
    return min(config.max_num_seqs, config.speculative_max_batch_size) * (1 + config.num_speculative_tokens)


def load_draft_model(config: Config, target: CausalLM, dtype: torch.dtype, device: torch.device) -> CausalLM | None:
    """The draft model of --speculative-model (4-bit or 16-bit, as --load-format says), or None."""
    if spec_method(config) != "draft":
        return None
    assert config.speculative_model is not None  # Config checks it
    draft = load_checkpoint(config.speculative_model, dtype, device, config.load_format,
                            config.max_model_len or 2048).model
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"--speculative-model has a vocabulary of {draft.config.vocab_size} tokens but the model "
                         f"has {target.config.vocab_size}: a draft model must use the model's tokenizer")
    logger.info("speculative decoding: draft model %s (%d layers), %d tokens per step",
                config.speculative_model, draft.config.num_layers, config.num_speculative_tokens)
    return draft


def build_spec_decoder(config: Config, block_manager: BlockManager, max_model_len: int, draft: CausalLM | None,
                       dtype: torch.dtype, device: torch.device) -> SpecDecoder | None:
    method = spec_method(config)
    if method is None:
        return None
    spec = SpecConfig(method, config.num_speculative_tokens, config.speculative_max_batch_size,
                      config.prompt_lookup_min, config.prompt_lookup_max)
    runner = None
    if draft is not None:
        buckets = None
        if device.type == "cuda" and not config.enforce_eager and getattr(draft, "supports_cuda_graphs", True):
            # Sized to the cap: no larger batch speculates.
            buckets = default_buckets(min(config.max_num_seqs, config.speculative_max_batch_size))
        runner = DraftRunner(draft, block_manager.num_blocks, block_manager.block_size, device, dtype, max_model_len,
                             buckets)
        if device.type == "cuda" and config.warmup:
            runner.warmup(tuple(n for n in (5, 16, 100, 160, 300, 512) if n < max_model_len))
    if method == "ngram":
        logger.info("speculative decoding: n-gram lookup (%d-%d tokens), %d tokens per step",
                    spec.ngram_min, spec.ngram_max, spec.num_tokens)
    return SpecDecoder(spec, block_manager, max_model_len, runner)
