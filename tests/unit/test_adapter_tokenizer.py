"""An adapter folder's own tokenizer, chat template and EOS (as `tokenizer.save_pretrained` writes
them beside the adapter) serve its requests; the base model keeps its own; --chat-template covers
the base and the adapters without a template of their own. Real tokenizers from the demo model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from adapter_folders import ALPACA, REPLY_ID, SQL_ID, adapter_folder, save_alpaca_tokenizer

from sloth_serve.api.detokenizer import IncrementalDetokenizer
from sloth_serve.api.errors import APIError
from sloth_serve.api.prompts import render_chat
from sloth_serve.api.tokenizers import ModelTokenizer, TokenizerRegistry, base_entry, load_tokenizer
from sloth_serve.cli import build_parser, config_from_args
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.chat_template import (
    ChatTemplateError,
    read_folder_template,
    resolve_template_flag,
    template_hash,
)

FLAG = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
BASE_EOS = frozenset({0, 2})  # the demo's generation_config.json: <|im_end|>, <|endoftext|>
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = {name: adapter_folder(root, name) for name in ("alpaca", "legacy", "template_only", "plain", "no_template")}
    save_alpaca_tokenizer(out["alpaca"])
    save_alpaca_tokenizer(out["legacy"])  # older transformers: the template inside tokenizer_config.json
    config_path = out["legacy"] / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (out["legacy"] / "chat_template.jinja").read_text()
    config_path.write_text(json.dumps(config))
    (out["legacy"] / "chat_template.jinja").unlink()
    (out["template_only"] / "chat_template.jinja").write_text(ALPACA.replace("<|reply|>", "<|endoftext|>"))
    (out["template_only"] / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (out["template_only"] / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    tokenizer = load_tokenizer(DEMO_MODEL)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(out["no_template"]))
    return out


@pytest.fixture(scope="module")
def base() -> ModelTokenizer:
    return base_entry(DEMO_MODEL, BASE_EOS)


def registry(base: ModelTokenizer, folders: dict[str, Path]) -> TokenizerRegistry:
    adapters = [SimpleNamespace(adapter_id=i, name=n, path=str(p)) for i, (n, p) in enumerate(folders.items(), 1)]
    return TokenizerRegistry(base, adapters)  # type: ignore[arg-type]


def ids_of(entry: ModelTokenizer, conversation: list[dict[str, Any]]) -> list[int]:
    return list(entry.tokenizer.encode(render_chat(entry.tokenizer, conversation), add_special_tokens=False))


def test_adapter_prompt_follows_its_own_template_and_base_keeps_chatml(base: ModelTokenizer, folders: dict[str, Path]) -> None:
    tokens = registry(base, folders)
    alpaca = tokens.prepare(folders["alpaca"], "alpaca")
    assert render_chat(alpaca.tokenizer, HELLO) == "### Instruction:\nSay hello.\n\n### Response:\n"
    assert render_chat(base.tokenizer, HELLO) == "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    assert ids_of(alpaca, HELLO) == base.tokenizer.encode("### Instruction:\nSay hello.\n\n### Response:\n")
    assert ids_of(base, HELLO)[0] == 1  # <|im_start|>
    assert (alpaca.template_source, alpaca.tokenizer_source) == ("adapter", "adapter")
    assert base.template_source == "base" and alpaca.template_hash == template_hash(ALPACA) != base.template_hash


def test_adapter_added_tokens_encode_to_their_ids_and_decode_back(base: ModelTokenizer, folders: dict[str, Path]) -> None:
    alpaca = registry(base, folders).prepare(folders["alpaca"], "alpaca")
    assert alpaca.tokenizer.encode("<|reply|>", add_special_tokens=False) == [REPLY_ID]
    assert alpaca.tokenizer.encode("<SQL>", add_special_tokens=False) == [SQL_ID]
    assert len(base.tokenizer.encode("<SQL>", add_special_tokens=False)) > 1  # the base has no such token
    history = [*HELLO, {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]
    assert REPLY_ID in ids_of(alpaca, history)  # the template's end token, as one id
    detok = IncrementalDetokenizer(alpaca.tokenizer)
    text = "".join(detok.add([t]) for t in alpaca.tokenizer.encode(" SELECT <SQL> 1", add_special_tokens=False))
    assert text + detok.flush() == " SELECT <SQL> 1"
    assert alpaca.token_texts.text(SQL_ID) == "<SQL>"


def test_adapter_eos_is_its_tokenizers_and_generation_configs_beside_the_base(
    base: ModelTokenizer, folders: dict[str, Path]
) -> None:
    tokens = registry(base, folders)
    assert tokens.prepare(folders["alpaca"], "alpaca").eos_token_ids == BASE_EOS | {REPLY_ID}
    template_only = tokens.prepare(folders["template_only"], "template_only")
    assert template_only.eos_token_ids == BASE_EOS | {0, 7}  # tokenizer_config's eos_token + generation_config


def test_template_in_tokenizer_config_is_read_like_the_jinja_file(base: ModelTokenizer, folders: dict[str, Path]) -> None:
    legacy = registry(base, folders).prepare(folders["legacy"], "legacy")
    assert read_folder_template(folders["legacy"]) == ALPACA
    assert legacy.template_source == "adapter"
    assert render_chat(legacy.tokenizer, HELLO) == "### Instruction:\nSay hello.\n\n### Response:\n"


def test_template_only_folder_uses_the_base_tokenizer_with_its_template(base: ModelTokenizer, folders: dict[str, Path]) -> None:
    entry = registry(base, folders).prepare(folders["template_only"], "template_only")
    assert entry.tokenizer_source == "base" and entry.template_source == "adapter"
    assert entry.tokenizer._tokenizer is base.tokenizer._tokenizer  # the base's vocabulary, not a copy
    assert render_chat(entry.tokenizer, HELLO).startswith("### Instruction:")
    assert render_chat(base.tokenizer, HELLO).startswith("<|im_start|>")  # the base entry is untouched


def test_adapter_without_tokenizer_or_template_shares_the_base_entry(base: ModelTokenizer, folders: dict[str, Path]) -> None:
    tokens = registry(base, folders)
    assert tokens.prepare(folders["plain"], "plain") is base
    no_template = tokens.prepare(folders["no_template"], "no_template")  # own tokenizer saved without a template
    assert no_template.tokenizer_source == "adapter" and no_template.template_source == "base"
    assert render_chat(no_template.tokenizer, HELLO) == render_chat(base.tokenizer, HELLO)


def test_chat_template_flag_covers_base_and_adapters_without_their_own(folders: dict[str, Path]) -> None:
    flagged = base_entry(DEMO_MODEL, BASE_EOS, flag_template=FLAG)
    tokens = registry(flagged, folders)
    assert flagged.template_source == "flag"
    assert render_chat(flagged.tokenizer, HELLO) == "[user] Say hello.\n[assistant] "
    plain = tokens.prepare(folders["plain"], "plain")
    assert plain.template_source == "flag" and render_chat(plain.tokenizer, HELLO).startswith("[user]")
    alpaca = tokens.prepare(folders["alpaca"], "alpaca")
    assert alpaca.template_source == "adapter" and render_chat(alpaca.tokenizer, HELLO).startswith("### Instruction:")


def test_registry_reads_an_unprepared_adapter_on_first_use_and_forgets_unloaded_ones(
    base: ModelTokenizer, folders: dict[str, Path]
) -> None:
    tokens = registry(base, folders)
    assert tokens.of(0) is base
    assert tokens.of(1).template_source == "adapter"  # "alpaca": never `put`, read from its folder
    tokens.put(99, base)  # an adapter being committed
    tokens.adapters = []  # every adapter unloaded
    tokens.put(100, base)
    assert set(tokens._by_adapter) == {100}


def test_malformed_adapter_template_is_a_one_line_error(base: ModelTokenizer, folders: dict[str, Path], tmp_path: Path) -> None:
    bad = adapter_folder(tmp_path, "bad")
    (bad / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ChatTemplateError) as exc:
        registry(base, folders).prepare(bad, "bad")
    message = str(exc.value)
    assert "\n" not in message and "adapter 'bad'" in message and str(bad) in message and "not valid Jinja" in message
    tokens = TokenizerRegistry(base, [SimpleNamespace(adapter_id=5, name="bad", path=str(bad))])  # type: ignore[list-item]
    with pytest.raises(APIError) as api_exc:
        tokens.of(5)
    assert api_exc.value.status_code == 400


def test_chat_template_flag_takes_a_file_or_inline_jinja(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(FLAG)
    assert resolve_template_flag(str(path)) == FLAG
    assert resolve_template_flag(FLAG) == FLAG
    with pytest.raises(ChatTemplateError, match="no such file, and not inline Jinja"):
        resolve_template_flag(str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        resolve_template_flag("{{ messages[0]['content'] ")


def test_cli_refuses_a_malformed_template_before_loading(tmp_path: Path, folders: dict[str, Path]) -> None:
    parser = build_parser()
    with pytest.raises(ValueError, match="--chat-template: the chat template is not valid Jinja"):
        config_from_args(parser.parse_args(["--chat-template", "{% if %}"]))
    bad = adapter_folder(tmp_path, "bad")
    (bad / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ValueError, match="--lora bad"):
        config_from_args(parser.parse_args(["--lora", f"bad={bad}"]))
    config = config_from_args(parser.parse_args(["--chat-template", FLAG, "--lora", f"a={folders['alpaca']}"]))
    assert config.chat_template == FLAG


def test_offline_llm_serves_the_adapter_with_its_tokenizer_and_eos(folders: dict[str, Path]) -> None:
    from sloth_serve import LLM, SamplingParams

    llm = LLM(DEMO_MODEL, lora={"alpaca": str(folders["alpaca"]), "plain": str(folders["plain"])}, num_kv_blocks=64)
    assert llm.encode("<SQL>", "alpaca") == [SQL_ID] and SQL_ID not in llm.encode("<SQL>")
    assert render_chat(llm.tokenizer_of("alpaca"), HELLO).startswith("### Instruction:")
    reference = llm.generate("The", SamplingParams(max_tokens=6, temperature=0), adapter="plain")[0]
    stop_at = reference.token_ids[2]
    assert llm.tokenizers.of(llm.adapter_id("alpaca")).eos_token_ids == BASE_EOS | {REPLY_ID}
    # The same weights with one of those tokens as EOS (written before loading) stop there.
    (folders["plain"] / "generation_config.json").write_text(json.dumps({"eos_token_id": stop_at}))
    try:
        llm.adapters.register("plain-eos", folders["plain"])
        llm.tokenizers.put(llm.adapter_id("plain-eos"), llm.tokenizers.prepare(folders["plain"], "plain-eos"))
        stopped = llm.generate("The", SamplingParams(max_tokens=6, temperature=0), adapter="plain-eos")[0]
    finally:
        (folders["plain"] / "generation_config.json").unlink()
    first = reference.token_ids.index(stop_at)
    assert stopped.token_ids == reference.token_ids[: first + 1] and len(stopped.token_ids) < 6
