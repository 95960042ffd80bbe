"""The generic path: a transformers causal LM's own modules run inside our engine. Attention goes to
our paged KV cache through transformers' AttentionInterface ("sloth_paged"), linears are our
LoRALinear (NF4 kernels, multi-LoRA slots), and the step's whole batch is one flat "sequence"."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

from sloth_kernels.attention import AttnMetadata, paged_attention, write_kv

from .config import ModelConfig
from .families import UnsupportedModel
from .generic_linear import GenericLinear, SliceGroup
from .generic_step import GenericStep
from .layers import StepMetadata
from .per_adapter import AdapterStep

ATTN_IMPLEMENTATION = "sloth_paged"
logger = logging.getLogger(__name__)


def paged_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One layer's attention over the step: q/k/v [1, heads, T, D] (RoPE applied by the model) ->
    [1, T, heads, D]; k and v are written to the layer's paged cache first."""
    if getattr(module, "sloth_dense", False):  # each sequence's rows over its own image states (sloth_serve.models.mllama)
        return cross_attention_forward(query, key, value, attention_mask, scaling)  # type: ignore[arg-type]
    step: GenericStep | None = getattr(module, "sloth_step", None)
    if step is None:
        raise UnsupportedModel(f"{type(module).__name__} is not a module of the model being served")
    _check_supported(module, attention_mask, kwargs)
    layer = getattr(module, "layer_idx", None)
    source = kv_source(module)
    if step.shapes is not None and isinstance(layer, int):
        if source is None:  # a layer reading another's cache holds none of its own
            step.shapes[layer] = (key.shape[1], key.shape[-1], value.shape[-1])
        step.windows[layer] = kwargs.get("sliding_window")
        step.layers_called.append(layer)
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    if step.meta is None or step.kv_caches is None:
        raise UnsupportedModel(f"{type(module).__name__} ran outside an engine step")
    cache_layer = layer if source is None else source
    if not isinstance(layer, int) or not isinstance(cache_layer, int) or not 0 <= cache_layer < len(step.kv_caches):
        raise UnsupportedModel(f"{type(module).__name__} has layer index {layer!r} (its cache: {cache_layer!r}); the "
                               f"KV cache holds {len(step.kv_caches)} layers")
    k_cache, v_cache = step.kv_caches[cache_layer]
    value_dim = value.shape[-1]
    if tuple(key.shape[1:2]) + tuple(key.shape[3:]) != tuple(k_cache.shape[2:]) or value_dim > key.shape[-1]:
        raise UnsupportedModel(f"layer {layer}'s keys are {key.shape[1]} heads of {key.shape[-1]} (values "
                               f"{value_dim} wide); its KV cache holds {k_cache.shape[2]} heads of "
                               f"{k_cache.shape[3]}")
    if value_dim < key.shape[-1]:  # narrower values (multi-head latent attention): zero columns, cut off below
        value = torch.nn.functional.pad(value, (0, key.shape[-1] - value_dim))
    attn: AttnMetadata = step.meta.attn
    q = query[0].transpose(0, 1).to(k_cache.dtype).contiguous()
    k = key[0].transpose(0, 1).to(k_cache.dtype).contiguous()
    v = value[0].transpose(0, 1).to(v_cache.dtype).contiguous()
    if source is None:  # a KV-shared layer's keys are its source layer's, already in that layer's cache
        write_kv(k, v, k_cache, v_cache, attn.slot_mapping)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = paged_attention(q, k_cache, v_cache, attn, scale, kwargs.get("sliding_window"), kwargs.get("softcap"))
    step.layers_called.append(layer)
    return out[..., :value_dim].to(query.dtype).unsqueeze(0), None


def kv_source(module: nn.Module) -> int | None:
    """The earlier layer whose cached keys and values this attention reads without writing its own
    (the KV-shared last layers of Gemma 3n and Gemma 4); None: its own. Gemma 3n names the layer
    (`kv_shared_layer_index`); Gemma 4 reads the last layer of its own kind before the shared ones."""
    if not getattr(module, "is_kv_shared_layer", False):
        return None
    source = getattr(module, "kv_shared_layer_index", None)
    config = getattr(module, "config", None)
    if source is None and config is not None and hasattr(module, "layer_type"):
        first_shared = config.num_hidden_layers - config.num_kv_shared_layers
        kinds = list(config.layer_types[:first_shared])
        if module.layer_type in kinds:
            source = len(kinds) - 1 - kinds[::-1].index(module.layer_type)
    if not isinstance(source, int):
        raise UnsupportedModel(f"{type(module).__name__} shares another layer's keys and values without naming "
                               "which layer's")
    return source


def cross_attention_forward(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                            masks: list[torch.Tensor], scaling: float | None) -> tuple[torch.Tensor, None]:
    """Cross-attention of q [1, heads, R, D], whose rows are those of several sequences one after
    another, each sequence's rows over its own keys and values [kv heads, N_i, D] under its additive
    mask [rows, N_i] (no cache) -> [1, R, heads, D]; scores in float32. A loop over sequences, so the
    work is each sequence's rows times its own states, not every row times every sequence's."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    groups = query.shape[1] // keys[0].shape[0]
    out = torch.empty(query.shape[2], query.shape[1], values[0].shape[-1], dtype=values[0].dtype,
                      device=query.device)
    row = 0
    for key, value, mask in zip(keys, values, masks, strict=True):
        n = mask.shape[0]
        k = key.repeat_interleave(groups, dim=0)
        v = value.repeat_interleave(groups, dim=0)
        scores = torch.matmul(query[0, :, row : row + n], k.transpose(1, 2)).float() * scale + mask.float()
        out[row : row + n] = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v).transpose(0, 1)
        row += n
    if row != query.shape[2]:
        raise ValueError(f"cross-attention masks cover {row} rows; the step gave {query.shape[2]}")
    return out.unsqueeze(0), None


def _check_supported(module: nn.Module, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
    name = type(module).__name__
    if attention_mask is not None:
        raise UnsupportedModel(f"{name} received a mask its model built itself (a bias or custom mask), which the "
                               "paged attention cannot apply")
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise UnsupportedModel(f"{name} uses attention sinks, which the generic path's attention does not apply")
    if kwargs.get("position_bias") is not None or getattr(module, "is_causal", True) is False:
        raise UnsupportedModel(f"{name} is not plain causal attention (a position bias or non-causal mask)")


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


class _HiddenFeed(nn.Module):
    """Stands in for the backbone inside the transformers causal LM, so that its own head (lm_head
    plus whatever the family does to logits: scales, soft-capping) runs on hidden states we pass."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> _FedOutput:
        return _FedOutput(self.hidden)


class _FedOutput:
    """The backbone's output as heads read it: the hidden states (by name or as item 0); whatever
    else a head looks at (router logits, cross-attentions, the cache) is None, as in inference."""

    def __init__(self, hidden: torch.Tensor | None) -> None:
        self.last_hidden_state = hidden

    def __getattr__(self, name: str) -> None:
        return None

    def __getitem__(self, key: int | str) -> torch.Tensor | None:
        if key in (0, "last_hidden_state"):
            return self.last_hidden_state
        raise KeyError(key)


class GenericCausalLM(nn.Module):
    """LlamaForCausalLM's interface over a transformers causal LM: forward(input_ids, positions,
    meta, kv_caches) -> final hidden states [T, hidden]; compute_logits(hidden) -> float32 logits."""

    supports_cuda_graphs = False  # transformers modules launch from Python each step: run eagerly
    is_generic = True

    config: ModelConfig  # set by the loader once kv_layout() has measured the model
    # Layers whose attention reaches the paged cache, as kv_layout() counts them: config.num_layers
    # plus the KV-shared layers that read an earlier layer's cache.
    num_attention_layers = 0

    def __init__(self, hf: PreTrainedModel, step: GenericStep, lora: dict[str, GenericLinear | SliceGroup]) -> None:
        super().__init__()
        self.step = step
        self._lora = lora
        self.architecture = type(hf).__name__
        prefix = str(hf.base_model_prefix)
        self.backbone = getattr(hf, prefix)
        for module in self.backbone.modules():  # where our attention function finds the step
            if hasattr(module, "layer_idx"):
                module.sloth_step = step
        self.feed = _HiddenFeed()
        for name, child in self.backbone.named_children():  # a head that reaches into the backbone's decoder
            if name == "decoder" or isinstance(child, PreTrainedModel):  # (OPT: self.model.decoder) finds the feed
                object.__setattr__(self.feed, name, self.feed)  # a plain attribute, not a registered submodule
        setattr(hf, prefix, self.feed)
        self.head = hf

    def lora_layers(self) -> dict[str, Any]:
        """LoRA-capable projections by the names PEFT adapters give them (q|k|v and gate|up grouped
        under qkv_proj / gate_up_proj, as sloth_serve.models.fused_names.fused_target names them)."""
        return dict(self._lora)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None) -> torch.Tensor:
        if adapters is not None:
            raise ValueError("adapters with their own embed_tokens / lm_head / norms are served on native families only")
        step = self.step
        step.meta, step.kv_caches = meta, kv_caches
        step.layers_called.clear()
        try:
            out = self.backbone(**self.token_inputs(input_ids.unsqueeze(0)), position_ids=positions.unsqueeze(0),
                                use_cache=False)
        finally:
            step.meta, step.kv_caches = None, None
        return out.last_hidden_state[0]

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone's inputs for token ids [1, T]. A per-layer input table smaller than the vocabulary
        (Gemma 3n's `vocab_size_per_layer_input`: the ids above it are image and audio tokens) is read
        at id 0 for those ids, as the multimodal model does, rather than past its end. (Gemma 4's tables
        span its whole vocabulary.)"""
        table = getattr(self.backbone, "embed_tokens_per_layer", None)
        embed = self.backbone.get_input_embeddings()
        if (getattr(self.backbone.config, "model_type", None) != "gemma3n_text" or not isinstance(table, nn.Embedding)
                or table.num_embeddings >= embed.num_embeddings):
            return {"input_ids": ids}
        per_layer_ids = torch.where(ids < table.num_embeddings, ids, torch.zeros_like(ids))
        return {"inputs_embeds": embed(ids), "per_layer_inputs": self.backbone.get_per_layer_inputs(per_layer_ids)}

    def compute_logits(self, hidden: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        if adapters is not None:
            raise ValueError("adapters with their own lm_head are served on native families only")
        self.feed.hidden = hidden.unsqueeze(0)
        try:
            out = self.head(input_ids=None, use_cache=False, logits_to_keep=0)
        finally:
            self.feed.hidden = None
        return out.logits[0].float()

    @torch.inference_mode()
    def kv_layout(self, device: torch.device) -> list[tuple[int, int]]:
        """Each cache-holding layer's (KV heads, head dim) as the model's attention calls show them
        (config fields are named differently across families, and some are set but unused); layers
        that read another layer's cache (KV sharing) hold none and come after those that do."""
        step = self.step
        step.shapes, step.windows = {}, {}
        step.layers_called.clear()
        try:
            ids = torch.tensor([1, 2], device=device)
            self.backbone(**self.token_inputs(ids.unsqueeze(0)), position_ids=ids.unsqueeze(0) - 1, use_cache=False)
            shapes = dict(step.shapes)
            self.num_attention_layers = len(step.layers_called)
        finally:
            step.shapes = None
        if sorted(shapes) != list(range(len(shapes))) or not shapes:
            raise UnsupportedModel(f"{self.architecture}: attention reached sloth-serve for layers {sorted(shapes)}, "
                                   f"not for each layer from 0; its attention is not served")
        self._check_window_reaches_attention(list(step.windows.values()))
        wider = sorted({(k, v) for _, k, v in shapes.values() if v > k})
        if wider:
            raise UnsupportedModel(f"{self.architecture}'s values are wider than its keys {wider}; the paged KV "
                                   "cache holds values at most as wide as keys")
        narrower = sorted({(k, v) for _, k, v in shapes.values() if v < k})
        if narrower:  # multi-head latent attention, expanded per head by the model itself
            logger.warning("%s: values narrower than keys %s: the paged KV cache holds each head's expanded keys and "
                           "zero-padded values, not the compressed latent (more KV memory a token than the model "
                           "needs)", self.architecture, narrower)
        return [(heads, key_dim) for heads, key_dim, _ in (shapes[i] for i in range(len(shapes)))]

    def _check_window_reaches_attention(self, windows: list[int | None]) -> None:
        """A sliding window in the config that no layer's attention call carries is one transformers applies
        through its own mask or cache (Moshi's), which the paged attention never sees: refused, not ignored."""
        c = self.head.config.get_text_config()
        window = getattr(c, "sliding_window", None)
        types = getattr(c, "layer_types", None)
        if (not isinstance(window, int) or window >= int(getattr(c, "max_position_embeddings", 0) or 0)
                or getattr(c, "use_sliding_window", True) is False
                or (isinstance(types, list) and "sliding_attention" not in types)):
            return
        if not any(isinstance(w, int) for w in windows):
            raise UnsupportedModel(f"{self.architecture}'s sliding window ({window}) is applied by transformers' own "
                                   "mask or cache rather than passed to its attention, so the paged attention "
                                   "cannot apply it")

    @torch.inference_mode()
    def check_routing(self, dtype: torch.dtype, device: torch.device) -> None:
        """Two tokens through a scratch cache: every layer's attention must reach the paged KV cache
        once, in order, and the head must give a row of logits; anything else (a layer that attends by
        itself, a mask built by the model) is refused now rather than served wrong."""
        cfg = self.config
        caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                  for shape in ((1, 16, heads, dim) for heads, dim in cfg.kv_cache_shapes())]

        def tensor(values: list[int] | list[list[int]], kind: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.tensor(values, dtype=kind, device=device)

        attn = AttnMetadata(slot_mapping=tensor([0, 1], torch.long), block_tables=tensor([[0]]), seq_lens=tensor([2]),
                            query_start_loc=tensor([0, 2]), seq_lens_host=[2], query_start_loc_host=[0, 2],
                            max_query_len=2, max_seq_len=2, num_decodes=0)
        hidden = self(tensor([1, 2], torch.long), tensor([0, 1], torch.long), StepMetadata(attn), caches)
        called = list(self.step.layers_called)
        if called != list(range(self.num_attention_layers)):
            raise UnsupportedModel(f"{self.architecture}: attention reached the paged KV cache for layers {called}, "
                                   f"not each of its {self.num_attention_layers} layers once; its attention is not "
                                   "served")
        if self.compute_logits(hidden[-1:]).shape != (1, cfg.vocab_size):
            raise UnsupportedModel(f"{self.architecture}'s head does not give {cfg.vocab_size} logits a token")
