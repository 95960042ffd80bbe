"""Which tokenizer, chat template and EOS ids serve each model: the base model's (its template, or
--chat-template), and an adapter's own where its folder holds them (what Unsloth's `save_pretrained`
+ `tokenizer.save_pretrained` write beside the adapter). Every request encodes, renders its chat,
decodes and stops with its model's entry, so a batch may mix models with different templates."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..loader.chat_template import (
    ChatTemplateError,
    Template,
    check_template,
    read_folder_template,
    read_json,
    read_processor_template,
    template_hash,
)
from ..loader.tokenizer import has_tokenizer, load_tokenizer
from .errors import APIError
from .logprobs import TokenTexts

if TYPE_CHECKING:
    from ..adapters import AdapterRegistry

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelTokenizer:
    """What one servable model tokenizes and stops with."""

    tokenizer: Any  # a transformers tokenizer whose `chat_template` is the model's
    token_texts: TokenTexts  # logprobs' token text and bytes, cached per vocabulary
    eos_token_ids: frozenset[int]  # generation stops on any of these (unless ignore_eos)
    template_source: str  # "base", "adapter", "flag" (--chat-template) or "none"
    tokenizer_source: str  # "base" or "adapter"

    @property
    def template_hash(self) -> str | None:
        template = self.tokenizer.chat_template
        return template_hash(template) if template else None


def with_template(entry: ModelTokenizer, template: Template, source: str, where: str) -> ModelTokenizer:
    """The entry with another chat template; the vocabulary (and its token text cache) is shared."""
    check_template(template, where)
    tokenizer = copy.copy(entry.tokenizer)  # shallow: the Rust tokenizer underneath is shared, read-only
    tokenizer.chat_template = template
    return replace(entry, tokenizer=tokenizer, template_source=source)


def _token_id(tokenizer: Any, token: Any, where: str) -> int:
    """The id of a tokenizer_config.json special token (a string or an {"content": ...} object)."""
    text = token.get("content") if isinstance(token, dict) else token
    token_id = tokenizer.convert_tokens_to_ids(text) if isinstance(text, str) else None
    if not isinstance(token_id, int) or tokenizer.convert_ids_to_tokens(token_id) != text:
        raise ChatTemplateError(
            f"{where}: eos_token {text!r} is not in the tokenizer's vocabulary; save the tokenizer beside "
            "the adapter (tokenizer.save_pretrained) or remove eos_token from tokenizer_config.json"
        )
    return token_id


def _generation_eos(folder: Path) -> set[int]:
    path = folder / "generation_config.json"
    value = read_json(path).get("eos_token_id") if path.is_file() else None
    if value is None:
        return set()
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ChatTemplateError(f"{path}: eos_token_id must be a token id or a list of them; got {value!r}")
    return set(ids)


def overlay(parent: ModelTokenizer, folder: Path, where: str) -> ModelTokenizer:
    """`parent` (the base's entry) with what `folder` holds of its own: a tokenizer (its added tokens
    and EOS), a chat template, generation_config.json's EOS ids. Generation also stops on the
    parent's EOS ids, as `generate` on the base model with the adapter would. Host work: a tokenizer
    takes a while to load, so call it off the event loop."""
    where = f"{where} ({folder})"
    entry = parent
    eos = set(parent.eos_token_ids)
    if has_tokenizer(folder):
        tokenizer = load_tokenizer(folder)
        entry = ModelTokenizer(tokenizer, TokenTexts(tokenizer), parent.eos_token_ids, parent.template_source, "adapter")
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
    elif (folder / "tokenizer_config.json").is_file():  # only a template (and maybe its EOS) over the base's
        eos_token = read_json(folder / "tokenizer_config.json").get("eos_token")
        if eos_token is not None:
            eos.add(_token_id(parent.tokenizer, eos_token, where))
    eos |= _generation_eos(folder)
    own = read_folder_template(folder)
    if own is not None:
        entry = with_template(entry, own, "adapter", where)
    elif entry is not parent and parent.tokenizer.chat_template:  # its own tokenizer, no template: the base's
        entry = with_template(entry, parent.tokenizer.chat_template, parent.template_source, where)
    if entry is parent and eos == parent.eos_token_ids:
        return parent  # nothing of its own: the base's entry, shared
    return replace(entry, eos_token_ids=frozenset(eos))


def base_entry(folder: Path, eos_token_ids: frozenset[int], adapter_folder: Path | None = None,
               flag_template: str | None = None) -> ModelTokenizer:
    """The base model's entry: its folder's tokenizer, with what an adapter folder given as --model
    adds (its own tokenizer or template), and --chat-template over whichever template that gives."""
    tokenizer = load_tokenizer(folder)
    source = "base" if tokenizer.chat_template else "none"
    entry = ModelTokenizer(tokenizer, TokenTexts(tokenizer), eos_token_ids, source, "base")
    processor_template = None if tokenizer.chat_template else read_processor_template(folder)
    if processor_template is not None:  # an image-text model whose template only its processor holds
        entry = with_template(entry, processor_template, "base", f"{folder / 'chat_template.json'}")
    if adapter_folder is not None:
        entry = overlay(entry, adapter_folder, "--model")
    if flag_template is not None:
        entry = with_template(entry, flag_template, "flag", "--chat-template")
    return entry


class TokenizerRegistry:
    """Entries by engine adapter id (0: the base model). A reloaded adapter gets a new id, so an
    entry never outlives the files it was read from."""

    def __init__(self, base: ModelTokenizer, adapters: AdapterRegistry) -> None:
        self.base = base
        self.adapters = adapters
        self._by_adapter: dict[int, ModelTokenizer] = {}

    def prepare(self, folder: str | Path, name: str) -> ModelTokenizer:
        """An adapter's entry (host work; ValueError for a broken tokenizer or template)."""
        entry = overlay(self.base, Path(folder), f"adapter {name!r}")
        if entry is not self.base:
            logger.info("adapter %r: tokenizer from the %s, chat template from the %s, EOS ids %s",
                        name, entry.tokenizer_source, entry.template_source, sorted(entry.eos_token_ids))
        return entry

    def put(self, adapter_id: int, entry: ModelTokenizer) -> None:
        """Just before the adapter is committed (where commits are serialized: start-up or the engine
        thread), so no request sees its id without its entry; forgets adapters no longer loaded."""
        live = {a.adapter_id for a in self.adapters} | {adapter_id}
        for gone in self._by_adapter.keys() - live:
            del self._by_adapter[gone]
        self._by_adapter[adapter_id] = entry

    def of(self, adapter_id: int) -> ModelTokenizer:
        if not adapter_id:
            return self.base
        entry = self._by_adapter.get(adapter_id)
        if entry is not None:
            return entry
        # An adapter registered by a path that did not prepare its entry: read it now, never the base's.
        adapter = next((a for a in self.adapters if a.adapter_id == adapter_id), None)
        if adapter is None:  # unloaded meanwhile; the engine refuses the request anyway
            return self.base
        try:
            entry = self._by_adapter[adapter_id] = self.prepare(adapter.path, adapter.name)
        except ValueError as exc:
            raise APIError(f"adapter {adapter.name!r} could not be loaded: {exc}", 400, param="model") from exc
        return entry
