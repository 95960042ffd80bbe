"""Per-request whole modules of adapters (embed_tokens, lm_head, RMSNorm weights): each adapter's
tensors on the device, and one step's grouping of tokens and logit rows by adapter, so that those
modules apply to that adapter's tokens only and every other row keeps the base's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sloth_kernels.norm import rms_norm


@dataclass(slots=True)
class SlotModules:
    """One adapter's own modules on the device, in the engine's dtype (None: the base's)."""

    embed: torch.Tensor | None  # [vocab_size, hidden]
    lm_head: torch.Tensor | None  # [vocab_size, hidden]
    norms: dict[str, torch.Tensor]  # module name ("model.norm", "model.layers.3.input_layernorm") -> [n]
    vocab_size: int  # the width of its logits (more than the base's when it added tokens)


@dataclass(slots=True)
class AdapterGroup:
    modules: SlotModules
    token_rows: torch.Tensor  # long: this adapter's rows in the step's flat tokens
    logit_rows: torch.Tensor | None  # long: its rows among the hidden states that get logits (None: none)


@dataclass(slots=True)
class AdapterStep:
    """The adapters of one step that bring their own modules (adapters without any, and the base,
    are not in it: their rows keep the base's modules)."""

    groups: list[AdapterGroup]
    vocab_size: int  # the logits' width this step: the widest vocabulary in the batch

    def embed(self, table: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
        base_vocab = table.weight.shape[0]
        # An added token's id is past the base's table: those rows are overwritten below, but the
        # base lookup must not read out of bounds (a device assert on CUDA).
        ids = input_ids.clamp(max=base_vocab - 1) if self.vocab_size > base_vocab else input_ids
        h = table(ids)
        for g in self.groups:
            if g.modules.embed is not None:
                own = nn.functional.embedding(input_ids.index_select(0, g.token_rows), g.modules.embed)
                h.index_copy_(0, g.token_rows, own)
        return h

    def renorm(self, name: str, normed: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        """`normed` (x normalized with the base's weight) with each adapter's rows normalized with its
        own weight of module `name`, where it has one."""
        for g in self.groups:
            w = g.modules.norms.get(name)
            if w is not None:
                normed.index_copy_(0, g.token_rows, rms_norm(x.index_select(0, g.token_rows), w, eps))
        return normed

    def logits(self, hidden: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        """float32 [rows, vocab_size]: each row through its adapter's lm_head or the base's; a row
        narrower than the widest is padded with -inf, so it can never sample a token it lacks."""
        logits = nn.functional.linear(hidden, base_weight).float()
        base_vocab = base_weight.shape[0]
        if self.vocab_size > base_vocab:
            logits = nn.functional.pad(logits, (0, self.vocab_size - base_vocab), value=float("-inf"))
        for g in self.groups:
            if g.logit_rows is None or g.modules.lm_head is None:
                continue
            own = nn.functional.linear(hidden.index_select(0, g.logit_rows), g.modules.lm_head).float()
            if own.shape[1] < self.vocab_size:
                own = nn.functional.pad(own, (0, self.vocab_size - own.shape[1]), value=float("-inf"))
            logits.index_copy_(0, g.logit_rows, own)
        return logits
