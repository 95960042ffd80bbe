"""An adapter's own whole modules (PEFT `modules_to_save`, `trainable_token_indices`, the embedding
layers PEFT saves after a vocabulary resize): read from adapter_model.safetensors, checked against
the model, and turned into the tensors that serve that adapter's tokens (or replace the base's)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models.per_adapter import SlotModules
    from ..models.weights import CausalLM

PREFIX = "base_model.model."
EMBED, LM_HEAD = "model.embed_tokens", "lm_head"
NORM_SUFFIXES = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm",
                 "pre_feedforward_layernorm", "post_feedforward_layernorm")  # the last two: Gemma's
SERVED = ("embed_tokens, lm_head and the RMSNorm weights (norm, input_layernorm, post_attention_layernorm, q_norm, "
          "k_norm, and Gemma's pre_/post_feedforward_layernorm)")


@dataclass(slots=True)
class TableCopy:
    """An adapter's copy of an embedding-shaped weight [vocab, hidden]: whole rows (`weight`; None:
    start from the base model's), then `indices` rows replaced by `rows` (PEFT's trainable tokens)."""

    weight: torch.Tensor | None = None
    indices: torch.Tensor | None = None  # [n] long
    rows: torch.Tensor | None = None  # [n, hidden]
    original: torch.Tensor | None = None  # PEFT's `original_module` copy (the base's, resized)

    def num_rows(self, base_rows: int) -> int:
        return base_rows if self.weight is None else int(self.weight.shape[0])

    def build(self, base: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The whole table on `device`: always a new tensor, never a view of `base`."""
        w = base.detach().to(device=device, dtype=dtype, copy=True) if self.weight is None else \
            self.weight.to(device=device, dtype=dtype, copy=True)
        if self.indices is not None and self.rows is not None:
            w.index_copy_(0, self.indices.to(device), self.rows.to(device=device, dtype=dtype))
        return w


@dataclass(slots=True)
class AdapterModules:
    """What an adapter replaces besides its LoRA: our module name -> its own weight."""

    embed: TableCopy | None = None
    lm_head: TableCopy | None = None
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # "model.layers.0.input_layernorm" -> [n]

    def resolved(self, tied: bool) -> AdapterModules:
        """PEFT's reading on a base whose lm_head is its embedding (tie_word_embeddings): trainable
        tokens on the embedding change the lm_head too, a whole-embedding copy does not (the lm_head
        stays the base's embedding, resized when the vocabulary was: `original_module`)."""
        if not tied or self.lm_head is not None or self.embed is None:
            return self
        if self.embed.indices is not None:
            return replace(self, lm_head=TableCopy(self.embed.weight, self.embed.indices, self.embed.rows))
        if self.embed.original is not None:
            return replace(self, lm_head=TableCopy(self.embed.original))
        return self

    def vocab_size(self, base_vocab: int) -> int:
        return max(t.num_rows(base_vocab) for t in (self.embed, self.lm_head, TableCopy()) if t is not None)


def _strip(key: str) -> str:
    """Our module name: without PEFT's prefix, and an image-text model's language-model names (Gemma 3:
    model.language_model.*) as the text model's."""
    from ..models.weights import text_model_name

    key = key.removeprefix(PREFIX)
    return text_model_name(key, multimodal=True) or key


def _token_indices(cfg: dict, module: str, name: str) -> list[int]:
    spec = cfg.get("trainable_token_indices")
    if isinstance(spec, dict):
        for key, indices in spec.items():
            if module == key or module.endswith("." + key):
                return [int(i) for i in indices]
    elif isinstance(spec, list) and module in (EMBED, LM_HEAD):  # the input embedding (and its tied lm_head)
        return [int(i) for i in spec]
    raise ValueError(f"adapter {name!r} saves trainable tokens for {module} but adapter_config.json's "
                     f"trainable_token_indices names no indices for it ({spec!r}); re-save the adapter with PEFT")


def _table_part(key: str) -> tuple[str, str] | None:
    """(module, part) for a key of an embedding-shaped module, else None."""
    for module in (EMBED, LM_HEAD):
        for part in ("weight", "modules_to_save.weight", "original_module.weight",
                     "token_adapter.base_layer.weight", "token_adapter.trainable_tokens_delta"):
            if key == f"{module}.{part}":
                return module, part
    return None


def _norm_name(key: str) -> str | None:
    base = key.removesuffix(".modules_to_save.weight").removesuffix(".weight")
    if base == "model.norm" or (base.startswith("model.layers.") and base.endswith(NORM_SUFFIXES)):
        return base
    return None


def read_adapter_modules(name: str, cfg: dict, full_tensors: dict[str, torch.Tensor]) -> AdapterModules | None:
    """Sort an adapter's non-LoRA tensors (keys as saved, with or without PEFT's `base_model.model.`)
    into the modules they replace; None when it has none. A tensor that cannot be served stops the load."""
    modules = AdapterModules()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for raw_key, tensor in full_tensors.items():
        key = _strip(raw_key)
        table = _table_part(key)
        if table is not None:
            parts.setdefault(table[0], {})[table[1]] = tensor
            continue
        norm = _norm_name(key)
        if norm is not None and tensor.dim() == 1:
            modules.norms[norm] = tensor
            continue
        raise ValueError(
            f"adapter {name!r} saves its own copy of {raw_key} (modules_to_save); sloth-serve serves per "
            f"request only {SERVED}. Remove it from modules_to_save, or merge the adapter into the base "
            f"(Unsloth's save_pretrained_merged) and serve the merged folder")
    for module, got in parts.items():
        copy = _table_copy(name, cfg, module, got)
        if module == EMBED:
            modules.embed = copy
        else:
            modules.lm_head = copy
    if modules.embed is None and modules.lm_head is None and not modules.norms:
        return None
    return modules


def _table_copy(name: str, cfg: dict, module: str, got: dict[str, torch.Tensor]) -> TableCopy:
    whole, saved = got.get("weight"), got.get("modules_to_save.weight")
    if whole is not None and saved is not None and not torch.equal(whole, saved):
        raise ValueError(f"adapter {name!r} holds two different copies of {module} ({module}.weight and "
                         f"{module}.modules_to_save.weight); re-save it with PEFT's save_pretrained")
    whole = whole if whole is not None else saved
    delta = got.get("token_adapter.trainable_tokens_delta")
    base_layer = got.get("token_adapter.base_layer.weight")
    if delta is None:
        if base_layer is not None:
            raise ValueError(f"adapter {name!r} has {module}.token_adapter.base_layer.weight without its "
                             f"trainable_tokens_delta; the folder is incomplete")
        if whole is None:
            raise ValueError(f"adapter {name!r} holds only PEFT's original_module copy of {module}, not the "
                             f"adapter's own; re-save it with PEFT's save_pretrained")
        return TableCopy(whole, original=got.get("original_module.weight"))
    if whole is not None:
        raise ValueError(f"adapter {name!r} trains {module} both whole (modules_to_save) and by token "
                         f"(trainable_token_indices); PEFT does not write that, re-save the adapter")
    indices = _token_indices(cfg, module, name)
    if len(indices) != delta.shape[0]:
        raise ValueError(f"adapter {name!r}: {module} has {delta.shape[0]} trainable token rows but "
                         f"trainable_token_indices lists {len(indices)}")
    return TableCopy(base_layer, torch.tensor(indices, dtype=torch.long), delta)


def check_adapter_modules(name: str, modules: AdapterModules, model: CausalLM) -> AdapterModules:
    """The modules as this model reads them (tied lm_head resolved); raises on any that do not fit."""
    cfg = model.config
    if getattr(model, "is_generic", False):
        raise ValueError(f"adapter {name!r} saves its own {SERVED.split(' (')[0]} (modules_to_save or trainable "
                         f"tokens), which are served on native families only; this {cfg.family} model runs on the "
                         f"generic path: merge it into the base with PEFT (merge_and_unload) and serve that folder")
    modules = modules.resolved(cfg.tie_word_embeddings)
    for label, table in (("embed_tokens", modules.embed), ("lm_head", modules.lm_head)):
        if table is None:
            continue
        for what, t in (("weight", table.weight), ("trainable token rows", table.rows)):
            if t is not None and (t.dim() != 2 or t.shape[1] != cfg.hidden_size):
                raise ValueError(f"adapter {name!r}: its {label} {what} has shape {tuple(t.shape)}, this model's "
                                 f"hidden size is {cfg.hidden_size} (trained for another base?)")
        rows = table.num_rows(cfg.vocab_size)
        if rows < cfg.vocab_size:
            raise ValueError(f"adapter {name!r}: its {label} has {rows} rows, fewer than the base's vocabulary "
                             f"of {cfg.vocab_size} (trained for another base?)")
        if table.indices is not None and int(table.indices.max()) >= rows:
            raise ValueError(f"adapter {name!r}: trainable token {int(table.indices.max())} is past its "
                             f"{label}'s {rows} rows; resize the base's embeddings before loading it in PEFT "
                             f"and save again")
    embed_rows = modules.embed.num_rows(cfg.vocab_size) if modules.embed else cfg.vocab_size
    head_rows = modules.lm_head.num_rows(cfg.vocab_size) if modules.lm_head else cfg.vocab_size
    if embed_rows != head_rows:
        raise ValueError(
            f"adapter {name!r} has a vocabulary of {embed_rows} input and {head_rows} output tokens (its own "
            f"embed_tokens / lm_head against the base's {cfg.vocab_size}); the rows it lacks were never saved. "
            f"Train with modules_to_save=['embed_tokens', 'lm_head'] after resizing, and save again")
    from ..models.layernorm import LayerNorm

    names = dict(model.named_modules())
    for norm, w in modules.norms.items():
        target = names.get(norm)
        weight = getattr(target, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(w.shape):
            have = "no such module" if weight is None else f"shape {tuple(weight.shape)}"
            raise ValueError(f"adapter {name!r} saves {norm} of shape {tuple(w.shape)}; this model has {have}")
        if isinstance(target, LayerNorm):  # Cohere / StableLM: per-adapter norms are RMSNorms only
            raise ValueError(f"adapter {name!r} saves its own {norm} (a LayerNorm), which sloth-serve does not apply "
                             f"per adapter: merge it into the base with PEFT and serve that folder")
        if norm.endswith("linear_attn.norm"):  # Qwen3.5's gated norm: only the base's is applied
            raise ValueError(f"adapter {name!r} saves its own {norm} (a Gated DeltaNet's gated norm), which sloth-serve "
                             f"does not apply per adapter: merge it into the base with PEFT and serve that folder")
    return modules


def materialize(modules: AdapterModules, model: CausalLM, dtype: torch.dtype,
                device: torch.device) -> SlotModules:
    """The adapter's own tensors on `device`, in the engine's dtype (modules already checked)."""
    from ..models.per_adapter import SlotModules

    base_embed = model.model.embed_tokens.weight
    base_head = base_embed if model.lm_head is None else model.lm_head.weight
    embed = modules.embed.build(base_embed, dtype, device) if modules.embed else None
    lm_head = modules.lm_head.build(base_head, dtype, device) if modules.lm_head else None
    norms = {n: w.to(device=device, dtype=dtype, copy=True) for n, w in modules.norms.items()}
    return SlotModules(embed, lm_head, norms, modules.vocab_size(model.config.vocab_size))


@torch.no_grad()
def merge_adapter_modules(name: str, modules: AdapterModules, model: CausalLM, dtype: torch.dtype) -> None:
    """Make the adapter's modules the base's (--merge-lora); a resized vocabulary resizes the model."""
    from torch import nn

    modules = check_adapter_modules(name, modules, model)
    device = model.model.embed_tokens.weight.device
    own = materialize(modules, model, dtype, device)
    if own.lm_head is not None or (own.embed is not None and model.lm_head is None):
        # The lm_head leaves the embedding when either changes alone: untie (the base's copy kept).
        head = own.lm_head if own.lm_head is not None else model.model.embed_tokens.weight.detach().clone()
        model.lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False, device="meta")
        model.lm_head.weight = nn.Parameter(head, requires_grad=False)
    if own.embed is not None:
        model.model.embed_tokens = nn.Embedding.from_pretrained(own.embed, freeze=True)
    for norm, w in own.norms.items():
        model.get_submodule(norm).weight = nn.Parameter(w, requires_grad=False)
    if own.vocab_size != model.config.vocab_size or (model.config.tie_word_embeddings and model.lm_head is not None):
        model.config = replace(model.config, vocab_size=own.vocab_size,
                               tie_word_embeddings=model.lm_head is None)
