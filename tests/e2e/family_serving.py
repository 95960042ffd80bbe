"""What the "a family served over HTTP" end-to-end tests share: a tiny random checkpoint of the family
with the demo tokenizer beside it, a PEFT adapter with random B matrices, servers launched on it (the
references load while they start), transformers' and PEFT's greedy references (each model loaded
once), and the checks of what the official `openai` client gets: completions (one at a time or all at
once, with log-probabilities if asked) and chat (whole and streamed).

One place for these keeps each family's file down to what is particular to the family (its config,
its adapter's modules, its own checks), so that a fix to the common part is made once."""

from __future__ import annotations

import importlib
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import httpx
import torch
from live_server import LiveServer, launch
from openai import OpenAI
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from sloth_serve.loader import DEMO_MODEL

TESTS = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MESSAGES = [{"role": "user", "content": "What does json.dumps do with a tuple?"}]
EXTRA = {"ignore_eos": True, "skip_special_tokens": False}  # every token asked for, special ones as text


def tests_module(name: str, *folders: str) -> ModuleType:
    """A module of tests/<folder> (a family's factories and references), those folders made importable
    as pytest makes them (a test module of the same name is the same module)."""
    for folder in reversed(folders):
        path = str(TESTS / folder)
        if path not in sys.path:
            sys.path.insert(0, path)
    return importlib.import_module(name)


tests_module.__test__ = False  # type: ignore[attr-defined]  # (imported into test modules: not a test itself)


def copy_demo_tokenizer(folder: Path, generation_config: bool = False) -> Path:
    """The demo model's tokenizer (and, if asked, its generation config) beside a random checkpoint:
    a vocabulary of 4096 and a chat template, so the server can serve chat and decode text."""
    for name in (*TOKENIZER_FILES, *(["generation_config.json"] if generation_config else [])):
        if (DEMO_MODEL / name).is_file():
            shutil.copy(DEMO_MODEL / name, folder / name)
    return folder


def write_random_model(config: PretrainedConfig, folder: Path, generation_config: bool = False
                       ) -> tuple[Path, torch.nn.Module]:
    """transformers' random model of `config` (seed 0, eager attention: the reference) saved in
    `folder` with the demo tokenizer, and the instance itself."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    copy_demo_tokenizer(folder, generation_config)
    return folder, model


def write_random_adapter(base: Path, folder: Path, target_modules: list[str], seed: int = 3) -> Path:
    """PEFT's own adapter (r 8, alpha 16) on `target_modules` of the checkpoint in `base`, its B
    matrices random: a fresh adapter's are zero and would change nothing."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=target_modules))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(folder))
    return folder


class Servers:
    """Family servers launched together (their model loading overlaps, and with the references'),
    stopped together when the block ends, whatever happened."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[LiveServer] = []

    def launch(self, name: str, folder: Path, *flags: str, loras: dict[str, Path] | None = None,
               load_format: str | None = "safetensors") -> LiveServer:
        """`--model folder` (its adapters as `--lora id=path`), blocks of 8, no warm-up, no demo adapter;
        `flags` add to that (budget, dtype, device). `load_format` None: the default (Unsloth) path."""
        server = launch(self.tmp, name, "--model", str(folder),
                        *(["--load-format", load_format] if load_format else []),
                        *(arg for lora_id, path in (loras or {}).items() for arg in ("--lora", f"{lora_id}={path}")),
                        "--block-size", "8", "--no-warmup", *flags, demo_adapter=False)
        self.started.append(server)
        return server

    def ready(self, while_starting: Callable[[], object] | None = None) -> None:
        """Run `while_starting` (load the references) while the servers start, then wait for them."""
        if while_starting is not None:
            while_starting()
        for server in self.started:
            server.wait_ready()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for server in self.started:
            server.stop()


_references: dict[tuple[Path, Path | None], torch.nn.Module] = {}


def reference_model(folder: Path, adapter: Path | None = None) -> torch.nn.Module:
    """transformers' float32 eager model of `folder` (PEFT's on it for `adapter`), loaded once."""
    model = _references.get((folder, adapter))
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        _references[(folder, adapter)] = model
    return model


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """`model`'s greedy tokens past EOS and each one's log-probability."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,  # type: ignore[operator]
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


def reference(folder: Path, adapter: Path | None, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' (or PEFT's) greedy tokens and log-probabilities for `prompt`."""
    return greedy(reference_model(folder, adapter), prompt, max_tokens)


def chat_prompt(tokenizer: Any, messages: list[dict[str, Any]] = MESSAGES) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def complete(client: OpenAI, model: str, prompt: list[int], max_tokens: int, logprobs: bool = False) -> Any:
    """A greedy completion of every one of `max_tokens` tokens, special ones kept in the text."""
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body=EXTRA, **({"logprobs": 0} if logprobs else {}))


def check_completions(client: OpenAI, tokenizer: Any, jobs: Sequence[tuple[str, list[int]]],
                      expected: Sequence[tuple[list[int], list[float] | None]], at_once: bool = False) -> list[str]:
    """Complete each (model id, prompt) of `jobs`, one after another or all at once, and check that
    each gets its expected tokens (as text, and as usage), and their log-probabilities within 1e-3
    where expected gives them. Returns the texts."""
    def one(job: tuple[tuple[str, list[int]], tuple[list[int], list[float] | None]]) -> str:
        (model, prompt), (tokens, logprobs) = job
        r = complete(client, model, prompt, len(tokens), logprobs=logprobs is not None)
        choice = r.choices[0]
        assert r.usage is not None and r.usage.completion_tokens == len(tokens), (model, len(prompt))
        assert choice.text == tokenizer.decode(tokens, skip_special_tokens=False), (model, len(prompt))
        if logprobs is not None:
            assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
            assert all(math.isclose(a, b, abs_tol=1e-3)
                       for a, b in zip(choice.logprobs.token_logprobs, logprobs, strict=True)), (model, len(prompt))
        return str(choice.text)

    work = list(zip(jobs, expected, strict=True))
    if not at_once:
        return [one(job) for job in work]
    with ThreadPoolExecutor(len(work)) as pool:
        return list(pool.map(one, work))


def check_base_and_adapter(server: LiveServer, folder: Path, base_id: str, adapter: Path, prompts: list[list[int]],
                           max_tokens: int, logprobs: bool = False, at_once: bool = False) -> None:
    """Every prompt to the base model gets transformers' tokens, and to the adapter (served as "tuned")
    PEFT's, whose output differs: the adapter is applied, not ignored."""
    jobs = [(model_id, lora, p) for model_id, lora in ((base_id, None), ("tuned", adapter)) for p in prompts]
    expected = []
    for _, lora, prompt in jobs:
        tokens, token_logprobs = reference(folder, lora, prompt, max_tokens)
        expected.append((tokens, token_logprobs if logprobs else None))
    texts = check_completions(server.client(), AutoTokenizer.from_pretrained(str(folder)),
                              [(model_id, p) for model_id, _, p in jobs], expected, at_once)
    assert texts[: len(prompts)] != texts[len(prompts) :]  # the adapter changes the output


def chat_whole_and_streamed(client: OpenAI, model: str, max_tokens: int, messages: list[dict[str, Any]] = MESSAGES,
                            extra_body: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The same greedy chat asked twice: its whole reply, and the text its stream adds up to."""
    kwargs: dict[str, Any] = dict(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                  extra_body=extra_body)
    whole = client.chat.completions.create(**kwargs)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(stream=True, **kwargs) if chunk.choices)
    return whole, streamed


def check_chat(client: OpenAI, model: str, tokenizer: Any, tokens: list[int],
               messages: list[dict[str, Any]] = MESSAGES) -> None:
    """A chat past EOS, whole and streamed, is the text of `tokens` (the reference's for its prompt)."""
    expected = tokenizer.decode(tokens, skip_special_tokens=True)
    whole, streamed = chat_whole_and_streamed(client, model, len(tokens), messages, {"ignore_eos": True})
    assert whole.choices[0].message.content == expected
    assert streamed == expected


def check_chat_stream_equals_whole(client: OpenAI, model: str, max_tokens: int = 8) -> None:
    """A chat as the client sends it (EOS may stop it): its stream says what its whole reply says."""
    whole, streamed = chat_whole_and_streamed(client, model, max_tokens)
    assert whole.choices[0].message.content == streamed and whole.usage is not None
    assert whole.usage.completion_tokens >= 1


def metric(server: LiveServer, name: str) -> float:
    """The sum of a /metrics family's samples (over its labels); the family must be there."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + "{")]
    assert samples, f"no {name} in /metrics"
    return sum(samples)
