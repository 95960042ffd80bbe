"""From notebook to endpoint (issue 11): a short fine-tune through Unsloth's API (here its CPU backend)
with `examples/finetune_and_serve.py`, then the folders it wrote served by sloth-serve.

The effect has to be visible after a few CPU steps, so the training data is the committed dataset's
questions with every answer replaced by one fixed phrase ("QUACK QUACK QUACK"), at a high learning
rate: a strong, easy effect that a few dozen steps learn. The served adapter must then answer
questions it never saw in training with that phrase, and the base must not.

One fine-tune (module fixture) feeds every test: the loss goes down, the adapter is a PEFT folder
whose base sloth-serve resolves, `LLM(base, lora=...)` hot-swaps it per request, the merged folder
serves the same effect, and the HTTP server (`--lora NAME=PATH`) answers `model: NAME` with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("unsloth")
pytest.importorskip("trl")

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.checkpoint import resolve_adapter_base
from sloth_serve.loader.peft import load_lora

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "upper_chat.jsonl"
PHRASE = "QUACK QUACK QUACK"
N_TRAIN = 64  # conversations trained on; the next ones in the file are the unseen questions
STEPS = 20
GREEDY = SamplingParams(max_tokens=16, temperature=0)


def load_module(path: Path, name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def conversations() -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in DATA.read_text(encoding="utf-8").splitlines() if line]


def user_turn(conv: list[dict[str, str]]) -> str:
    return next(m["content"] for m in conv if m["role"] == "user")


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():  # type: ignore[no-untyped-def]
    """One torch thread for this module (the script picks it too for the demo model on CPU): with the
    CPU cores shared, OpenMP's spin-waiting made 2-thread training steps 6-20x slower (measured)."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="module")
def example():  # type: ignore[no-untyped-def]
    return load_module(REPO / "examples" / "finetune_and_serve.py", "finetune_and_serve")


@pytest.fixture(scope="module")
def unseen_questions(example) -> list[str]:  # type: ignore[no-untyped-def]
    """Questions from the dataset beyond the trained slice whose stdlib names the slice never mentions."""
    convs = conversations()
    trained = set().union(*(example.dotted_names(user_turn(c)) for c in convs[:N_TRAIN]))
    out = [user_turn(c) for c in convs[N_TRAIN:] if not example.dotted_names(user_turn(c)) & trained]
    return out[::25][:4]


@pytest.fixture(scope="module")
def run(example, tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("finetune")
    data = tmp / "quack.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for conv in conversations()[:N_TRAIN]:
            quack = [*conv[:-1], {"role": "assistant", "content": PHRASE}]
            f.write(json.dumps({"messages": quack}) + "\n")
    out = tmp / "out"
    start = time.perf_counter()
    rc = example.main([
        "--data", str(data), "--out", str(out), "--steps", str(STEPS), "--batch-size", "4", "--lr", "5e-3",
        "--max-seq-length", "128", "--logging-steps", "1", "--max-tokens", "16", "--seed", "0",
    ])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - start
    print(f"\nlosses: {[round(x, 3) for _, x in summary['losses']]}")
    print(f"\nfine-tune + save + merge + offline serving: {summary['wall_seconds']:.1f}s "
          f"(training {summary['train_seconds']}s)")
    return summary


def test_dataset_is_small_upper_case_chat_data() -> None:
    convs = conversations()
    assert 200 <= len(convs) <= 1000 and DATA.stat().st_size < 200_000
    for conv in convs:
        assert [m["role"] for m in conv][-2:] == ["user", "assistant"]
        answer = conv[-1]["content"]
        assert answer == answer.upper() and any(c.isalpha() for c in answer)


def test_dataset_file_is_what_the_builder_writes(tmp_path: Path) -> None:
    builder = load_module(REPO / "examples" / "data" / "build_upper_chat.py", "build_upper_chat")
    if sys.version.split()[0] != builder.BUILT_WITH_PYTHON:
        pytest.skip(f"the committed file comes from Python {builder.BUILT_WITH_PYTHON}'s stdlib docstrings")
    lines = [builder.dumps(ex) + "\n" for ex in builder.build_examples()]
    assert "".join(lines) == DATA.read_text(encoding="utf-8")


def test_training_lowers_the_loss(run: dict) -> None:
    losses = [loss for _step, loss in run["losses"]]
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.25 * first, losses


def test_saved_adapter_is_a_peft_folder_sloth_serve_resolves(run: dict) -> None:
    adapter = Path(run["adapter"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert resolve_adapter_base(adapter) == Path(DEMO_MODEL).resolve()
    weights = load_lora("ft", adapter, max_rank=64)
    assert len(weights.tensors) == 4 * 7  # every projection of every layer


def test_merged_folder_was_written(run: dict) -> None:
    merged = Path(run["merged"])
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert (merged / "tokenizer.json").is_file()
    assert not (merged / "adapter_config.json").exists()


def test_example_printed_the_effect_for_held_out_questions(run: dict) -> None:
    samples = run["samples"]
    assert run["questions"]
    assert all(t.startswith(PHRASE) for t in samples["lora:finetuned"]), samples
    assert all(t.startswith(PHRASE) for t in samples["merged"]), samples
    assert not any("QUACK" in t for t in samples["base"]), samples


def test_hot_swapped_adapter_answers_unseen_questions_with_the_trained_phrase(
    run: dict, unseen_questions: list[str]
) -> None:
    assert len(unseen_questions) >= 3
    llm = LLM(DEMO_MODEL, lora={"ft": run["adapter"]}, num_kv_blocks=256)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in unseen_questions]
    tuned = llm.generate(prompts, GREEDY, adapter="ft")
    plain = llm.generate(prompts, GREEDY)
    which = ["ft" if i % 2 == 0 else None for i in range(len(prompts))]
    mixed = llm.generate(prompts, GREEDY, adapter=which)
    assert all(o.text.startswith(PHRASE) for o in tuned), [o.text for o in tuned]
    assert not any("QUACK" in o.text for o in plain), [o.text for o in plain]
    # base and adapter requests in one batch: each gets its own
    for i, o in enumerate(mixed):
        assert o.token_ids == (tuned[i] if which[i] else plain[i]).token_ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_http_server_serves_the_adapter_by_name(run: dict, unseen_questions: list[str], tmp_path: Path) -> None:
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sloth_serve.cli", "--model", str(DEMO_MODEL), "--lora", f"finetuned={run['adapter']}",
         "--host", "127.0.0.1", "--port", str(port), "--num-kv-blocks", "256", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert "finetuned" in {m.id for m in client.models.list().data}
        messages = [{"role": "user", "content": unseen_questions[0]}]
        tuned = client.chat.completions.create(model="finetuned", messages=messages, max_tokens=16, temperature=0)
        plain = client.chat.completions.create(model=DEMO_MODEL.name, messages=messages, max_tokens=16, temperature=0)
        assert (tuned.choices[0].message.content or "").startswith(PHRASE)
        assert "QUACK" not in (plain.choices[0].message.content or "")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
