"""The benchmark tools on CPU: the serving client's measurements against a scripted SSE server with
known delays (a test of the client, not of sloth-serve), its workload generators, the random-model
builder's checkpoints and adapters, and the peers script on a tiny model."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_sse_server import FakeServer, Script

from bench import make_random_model, peers, serve
from bench.common import percentile, summarize

ROOT = Path(__file__).resolve().parents[2]
TTFT, ITL = 0.10, 0.03
# Upper slack on timings: this CPU machine is shared, and the scripted server runs in this process.
SLACK = 0.08


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    script = Script(ttft=TTFT, itl=ITL, failing_models=("bad",))
    with FakeServer(script) as server:
        yield server


def run_client(fake: FakeServer, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "serve.json"
    rc = serve.main(["--base-url", fake.base_url, "--input-len", "16", "--output-len", "8", "--num-prompts", "8",
                     "--max-concurrency", "4", "--disable-tqdm", "--json-out", str(out), *extra])
    return rc, json.loads(out.read_text())["metrics"]


# ---------------------------------------------------------------- metric math, no server


def test_sse_parser_joins_events_split_across_reads() -> None:
    parser = serve.SSEParser()
    assert parser.feed(b'data: {"a": 1}\n\nda') == ['{"a": 1}']
    assert parser.feed(b"ta: [DO") == []
    assert parser.feed(b"NE]\r\n\r\n: ping\n\n") == ["[DONE]"]


def test_ttft_itl_tpot_from_known_chunk_times() -> None:
    r = serve.RequestResult(0, "m", expected_output=4)
    chunks = [  # (time, payload): a role-only chunk, 4 tokens, a finish-only chunk, usage
        (0.01, {"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
        (0.10, {"choices": [{"delta": {"content": " a"}}]}),
        (0.12, {"choices": [{"delta": {"content": " b"}}]}),
        (0.15, {"choices": [{"delta": {"content": " c"}}]}),
        (0.19, {"choices": [{"delta": {"content": " d"}, "finish_reason": "length"}]}),
        (0.19, {"choices": [{"delta": {"content": ""}, "finish_reason": "length"}]}),
        (0.20, {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}),
    ]
    last = 0.0
    for t, obj in chunks:
        last = serve.handle_event(json.dumps(obj), r, t, 0.0, last)
    r.e2e, r.ok = 0.22, True
    assert r.ttft == pytest.approx(0.10)
    assert r.itl == pytest.approx([0.02, 0.03, 0.04])
    assert (r.prompt_tokens, r.output_tokens, r.num_chunks) == (7, 4, 4)
    assert r.tpot == pytest.approx((0.22 - 0.10) / 3)

    failed = serve.RequestResult(1, "m", expected_output=4, error="HTTP 500: boom", start=0.5)
    m = serve.metrics([r, failed], duration=2.0, percentiles=[50, 99])
    assert (m["completed"], m["failed"], m["errors"]) == (1, 1, {"HTTP 500: boom": 1})
    assert m["output_throughput"] == pytest.approx(2.0) and m["total_token_throughput"] == pytest.approx(5.5)
    assert m["itl_ms"]["p50"] == pytest.approx(30.0) and m["ttft_ms"]["mean"] == pytest.approx(100.0)
    assert m["output_len_mismatches"] == 0


def test_percentiles_interpolate_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert summarize([2.0, 4.0])["mean"] == 3.0


def test_poisson_arrivals_have_the_asked_rate() -> None:
    times = serve.send_times(4000, 20.0, 1.0, random.Random(0))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert times == serve.send_times(4000, 20.0, 1.0, random.Random(0))
    assert serve.send_times(3, float("inf"), 1.0, random.Random(0)) == [0.0, 0.0, 0.0]


def test_sharegpt_lengths_are_seeded_long_tailed_and_clipped() -> None:
    args = serve.parse_args(["--dataset", "sharegpt", "--num-prompts", "2000", "--max-len", "1024"])
    lengths = serve.sample_lengths(args, random.Random(0))
    ins = [i for i, _ in lengths]
    assert lengths == serve.sample_lengths(args, random.Random(0))
    assert min(ins) >= 4 and max(ins) <= 1024 and max(o for _, o in lengths) <= 1024
    assert percentile(ins, 50) == pytest.approx(160, rel=0.15)  # --input-len is the median
    assert sum(ins) / len(ins) > 1.3 * percentile(ins, 50)  # lognormal: mean above the median


# ---------------------------------------------------------------- the client against a scripted stream


def test_client_measures_a_scripted_stream(fake: FakeServer, tmp_path: Path) -> None:
    fake.script.bodies.clear()
    rc, m = run_client(fake, tmp_path)
    assert rc == 0 and (m["completed"], m["failed"]) == (8, 0)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (8 * 16, 8 * 8)
    assert TTFT <= m["ttft_ms"]["p50"] / 1000 < TTFT + SLACK
    assert ITL - 0.005 <= m["itl_ms"]["p50"] / 1000 < ITL + SLACK / 2
    assert ITL - 0.005 <= m["tpot_ms"]["mean"] / 1000 < ITL + SLACK / 2
    assert TTFT + 7 * ITL <= m["e2e_ms"]["p50"] / 1000 < TTFT + 7 * ITL + SLACK * 2
    assert m["max_concurrent_requests"] == 4 and m["output_len_mismatches"] == 0
    body = fake.script.bodies[-1]
    assert len(body["prompt"]) == 16 and all(isinstance(t, int) for t in body["prompt"])
    assert body["ignore_eos"] is True and body["max_tokens"] == 8 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_chat_role_chunk_does_not_count_as_first_token(fake: FakeServer, tmp_path: Path) -> None:
    rc, m = run_client(fake, tmp_path, "--endpoint", "chat")
    assert rc == 0 and m["completed"] == 8
    assert m["ttft_ms"]["p50"] / 1000 >= TTFT
    assert m["total_output_tokens"] == 64 and m["total_input_tokens"] == 8 * 16


def test_failed_requests_are_counted_and_exit_1(fake: FakeServer, tmp_path: Path) -> None:
    rc, m = run_client(fake, tmp_path, "--lora-names", "good,bad", "--skip-test-request")
    assert rc == 1
    assert (m["completed"], m["failed"]) == (4, 4)
    assert m["requests_by_model"] == {"good": 4, "bad": 4}
    assert any(e.startswith("HTTP 500") for e in m["errors"])


def test_refused_test_request_and_dead_server_exit_2(fake: FakeServer, tmp_path: Path) -> None:
    assert serve.main(["--base-url", fake.base_url, "--lora-names", "good,bad", "--disable-tqdm"]) == 2
    assert serve.main(["--base-url", "http://127.0.0.1:9/v1", "--disable-tqdm"]) == 2


def test_worker_processes_share_the_requests(fake: FakeServer, tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    cmd = [sys.executable, str(ROOT / "bench" / "serve.py"), "--base-url", fake.base_url, "--input-len", "8",
           "--output-len", "4", "--num-prompts", "12", "--max-concurrency", "6", "--num-workers", "2",
           "--disable-tqdm", "--json-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(out.read_text())["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (12, 0, 48)
    assert m["max_concurrent_requests"] <= 6


# ---------------------------------------------------------------- random models


def test_real_shapes_have_the_published_parameter_counts() -> None:
    def params(name: str) -> int:
        return sum(make_random_model._numel(d) for _, d in make_random_model.tensor_specs(make_random_model.SHAPES[name]))

    assert params("llama3-8b") == 8_030_261_248
    assert params("llama3.2-1b") == 1_235_814_400


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    # A small shard size forces several shards and an index file.
    rc = make_random_model.main(["--shape", "tiny", "--out", str(out), "--device", "cpu", "--shard-gb", "0.001",
                                 "--quantize-bnb", "--lora", "2"])
    assert rc == 0
    return out


def test_random_model_loads_in_transformers_with_every_weight(tiny: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny / "model.safetensors.index.json").is_file()
    model, info = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.rope_parameters["rope_type"] == "llama3"
    tok = AutoTokenizer.from_pretrained(tiny)
    assert len(tok) == model.config.vocab_size
    # Every id is visible text, so a streamed token is an SSE chunk; ids 0-2 are the demo's specials.
    assert all(tok.decode([i]) for i in range(3, model.config.vocab_size, 97))
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    quant = json.loads((tiny.with_name("tiny-bnb-4bit") / "config.json").read_text())["quantization_config"]
    assert quant["bnb_4bit_quant_type"] == "nf4"


def test_random_adapters_are_distinct_nonzero_peft_loras(tiny: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sloth_serve.loader.peft import load_lora

    loras = [tiny.with_name("tiny-loras") / f"lora-{i}" for i in range(2)]
    weights = [load_lora(f"l{i}", p, max_rank=16) for i, p in enumerate(loras)]
    assert all(len(w.tensors) == 2 * 7 and w.rank == 16 for w in weights)  # 2 layers x 7 projections
    ids = torch.tensor([[5, 6, 7, 8]])
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ref = base(ids).logits
    logits = []
    for path in loras:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), path)
        logits.append(model(ids).logits)
    assert not torch.allclose(logits[0], ref) and not torch.allclose(logits[0], logits[1])


# ---------------------------------------------------------------- peers


def test_peers_offline_throughput_on_cpu(tiny: Path, tmp_path: Path) -> None:
    """transformers + bitsandbytes only by default: each Unsloth peer spends ~20 s importing Unsloth
    on this CPU; SLOTH_BENCH_ALL_PEERS=1 runs all five."""
    chosen = peers.DEFAULT_PEERS if os.environ.get("SLOTH_BENCH_ALL_PEERS") == "1" else "hf-bnb"
    out = tmp_path / "peers.md"
    rc = peers.main(["--model", str(tiny), "--peers", chosen, "--batch-sizes", "1,2", "--prompt-len", "8",
                     "--new-tokens", "4", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows)
    assert {r["batch_size"] for r in rows if r["peer"] == "hf-bnb"} == {1, 2}
    assert "| transformers + bitsandbytes NF4 |" in out.read_text()


def test_peer_that_cannot_load_is_reported_not_dropped(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    out = tmp_path / "peers.md"
    rc = peers.main(["--model", str(broken), "--peers", "hf-bnb", "--batch-sizes", "1,2", "--device", "cpu",
                     "--out", str(out)])
    assert rc == 1
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["batch_size"], r["status"]) for r in rows] == [(1, "error"), (2, "error")]
    assert all(r["note"].startswith("load failed") for r in rows)
    assert "| transformers + bitsandbytes NF4 | error | error |" in out.read_text()
