#!/usr/bin/env python3
"""From an Unsloth notebook to an OpenAI-compatible endpoint, as one script.

The usual Unsloth notebook (4-bit base, LoRA on all 7 projections, TRL's ``SFTTrainer`` on chat
data, ``save_pretrained`` / ``save_pretrained_merged``), run on the embedded demo model and the
committed dataset ``examples/data/upper_chat.jsonl`` (stdlib questions answered in UPPER CASE), then
the folders it wrote served by sloth-serve, with nothing converted:

1. ``FastLanguageModel.from_pretrained(<base>, load_in_4bit=True, max_seq_length=...)``
2. ``FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=[q,k,v,o,gate,up,down],
   use_gradient_checkpointing="unsloth", random_state=seed)``
3. ``SFTTrainer(SFTConfig(...))`` on the chat template applied to every conversation, loss on the
   answers only (Unsloth's ``train_on_responses_only``); the training loss is logged every few steps
4. ``model.save_pretrained(OUT/adapter)`` + the tokenizer: a PEFT LoRA adapter folder
5. ``model.save_pretrained_merged(OUT/merged, tokenizer, save_method="merged_16bit")``.  Unsloth's
   CPU backend refuses to merge into a 4-bit model (``NotImplementedError``); the script then does
   what that error message advises (a clear log line says so): it reloads the saved adapter over the
   16-bit base (``FastLanguageModel.from_pretrained(OUT/adapter, load_in_4bit=False)``, PEFT's
   ``merge_and_unload`` underneath) and calls ``save_pretrained_merged`` there.
6. sloth-serve, offline (``server.LLM``): the base with the adapter hot-swapped per request
   (``LLM(base, lora={"finetuned": OUT/adapter})``), and the merged folder (``LLM(OUT/merged)``);
   greedy answers to questions that are not in the training data are printed with their share of
   upper-case letters (the trained effect).
7. ``--serve``: starts the HTTP server on the same folders
   (``python -m sloth_serve.cli --model <base> --lora finetuned=OUT/adapter``) and prints the curl and
   OpenAI-SDK calls that use the adapter by its name.

Run it from the repository root (CPU works: Unsloth's CPU backend is stock transformers + PEFT + TRL)::

    PYTHONPATH=. .venv/bin/python examples/finetune_and_serve.py                 # train, save, serve offline
    PYTHONPATH=. .venv/bin/python examples/finetune_and_serve.py --steps 5       # a quick smoke run
    PYTHONPATH=. .venv/bin/python examples/finetune_and_serve.py --serve         # ... then the HTTP server

Flags: ``--steps`` (optimizer steps, default 300), ``--out`` (default ``out/finetune-upper``, git-ignored),
``--device auto|cpu|cuda`` (``cpu`` forces Unsloth's CPU backend with ``UNSLOTH_FORCE_CPU=1``),
``--seed``; see ``--help`` for the rest.

Measured on this project's 2-core CPU machine (Unsloth 2026.10.9 CPU backend, torch 2.13.0+cpu,
bfloat16 autocast on AMX, one torch thread), with the cores shared with other jobs (load about 3):
the default run (300 steps of batch 8) took 2 min 16 s in all, 120 s of it training (0.4 s a step).
With 2 threads the same run took 4-20 minutes there (OpenMP spin-waiting against the other jobs),
hence ``--threads`` defaults to 1 for the demo model.
Loss 5.16 (first 15 steps) -> 2.45 (step 300);
greedy answers to the held-out questions go from 3% to 100% upper-case letters, for the hot-swapped
adapter and for the merged folder alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `from sloth_serve import LLM` without PYTHONPATH too

DATA = REPO / "examples" / "data" / "upper_chat.jsonl"
DEFAULT_OUT = REPO / "out" / "finetune-upper"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Questions about stdlib names that are not in examples/data/upper_chat.jsonl (checked at run time).
HELD_OUT_QUESTIONS = [
    "What does `json.dumps` do?",
    "Explain `os.path.join`.",
    "What is the `collections.OrderedDict` class?",
    "What is `shutil.copyfile` for?",
]
# The ChatML template's markers (the demo model's; Qwen-style models use the same).
INSTRUCTION_PART, RESPONSE_PART = "<|im_start|>user\n", "<|im_start|>assistant\n"

_T0 = time.time()


def log(msg: str) -> None:
    print(f"[finetune {time.time() - _T0:6.1f}s] {msg}", flush=True)


def default_base() -> Path:
    from sloth_serve.loader import DEMO_MODEL

    return Path(DEMO_MODEL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--base", type=Path, default=None, help="base model folder (default: the embedded demo model)")
    ap.add_argument("--data", type=Path, default=DATA, help="JSONL of {'messages': [...]} conversations")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT/adapter, OUT/merged, OUT/summary.json")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="cpu forces Unsloth's CPU backend (UNSLOTH_FORCE_CPU=1)")
    ap.add_argument("--seed", type=int, default=3407)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch; 0: 1 for the tiny demo model (see the docstring), else torch's default")
    ap.add_argument("--name", default="finetuned", help="adapter name clients put in `model`")
    ap.add_argument("--logging-steps", type=int, default=None, help="default: about 20 log lines")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per sample answer")
    ap.add_argument("--no-merge", action="store_true", help="skip save_pretrained_merged and the merged samples")
    ap.add_argument("--serve", action="store_true", help="then start the HTTP server on the adapter")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- training (Unsloth)


def import_unsloth(device: str):
    """Unsloth picks its backend when first imported: the CPU one when there is no accelerator, or
    when UNSLOTH_FORCE_CPU=1 (what --device cpu sets)."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base is a local folder: never the network
    if device == "cpu":
        if "unsloth" in sys.modules and getattr(sys.modules["unsloth"], "DEVICE_TYPE", "cpu") != "cpu":
            log("--device cpu: Unsloth was already imported with its GPU backend in this process; training stays there")
        os.environ["UNSLOTH_FORCE_CPU"] = "1"
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device here (use --device cpu or auto)")
    import unsloth  # noqa: F401  (before transformers / trl / peft, as Unsloth asks)
    from unsloth import FastLanguageModel

    return FastLanguageModel


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def load_dataset_with_template(path: Path, tokenizer):
    """The notebook's formatting step: every conversation through the tokenizer's chat template."""
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(path), split="train")

    def to_text(batch):
        return {"text": [tokenizer.apply_chat_template(m, tokenize=False) for m in batch["messages"]]}

    return ds.map(to_text, batched=True, remove_columns=ds.column_names)


def dotted_names(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+", text))


def held_out(questions: list[str], data: Path) -> list[str]:
    """The questions whose stdlib names no user turn of the training data mentions."""
    seen = set().union(*(dotted_names(m["content"]) for conv in read_conversations(data)
                         for m in conv if m["role"] == "user"))
    kept = [q for q in questions if not dotted_names(q) & seen]
    if len(kept) < len(questions):
        log(f"left out sample questions whose names are in the training data: {sorted(set(questions) - set(kept))}")
    return kept


def make_loss_logger(total_steps: int):
    from transformers import TrainerCallback

    class LossLogger(TrainerCallback):
        """One line per logging step (the progress bar is off): the training loss as it goes."""

        def __init__(self) -> None:
            self.losses: list[tuple[int, float]] = []
            self.started = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                loss = float(logs["loss"])
                self.losses.append((state.global_step, loss))
                log(f"step {state.global_step:4d}/{total_steps}  loss {loss:.4f}  "
                    f"lr {float(logs.get('learning_rate', 0)):.2e}  {time.time() - self.started:.1f}s")

    return LossLogger()


def train(args, FastLanguageModel, base: Path) -> dict:
    import torch
    from trl import SFTConfig, SFTTrainer
    from unsloth.chat_templates import train_on_responses_only

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(base),
        max_seq_length=args.max_seq_length,
        load_in_4bit=True,
        dtype=None,  # Unsloth's choice: bfloat16 where the hardware has it
        local_files_only=True,
    )
    n4 = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    log(f"loaded {base} through Unsloth: {type(model).__name__}, {n4} Linear4bit layers, dtype {model.dtype}")
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=args.seed,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"get_peft_model: r=8, alpha=16, {len(LORA_TARGETS)} projections, {trainable:,} trainable parameters")

    dataset = load_dataset_with_template(args.data, tokenizer)
    log(f"dataset {args.data.relative_to(REPO) if args.data.is_relative_to(REPO) else args.data}: "
        f"{len(dataset)} conversations; the first after the chat template:\n{dataset[0]['text']}")

    logging_steps = args.logging_steps or max(1, args.steps // 20)
    config = SFTConfig(
        output_dir=str(args.out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=min(10, max(1, args.steps // 10)),
        lr_scheduler_type="linear",
        optim="adamw_8bit",  # the notebooks' choice; Unsloth's CPU backend swaps in fused AdamW
        weight_decay=0.0,
        logging_steps=logging_steps,
        seed=args.seed,
        data_seed=args.seed,
        dataset_text_field="text",
        max_length=args.max_seq_length,
        packing=False,
        dataset_num_proc=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=bool(model.dtype == torch.bfloat16),
    )
    loss_logger = make_loss_logger(args.steps)
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        args=config,
        callbacks=[loss_logger],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # LossLogger prints the losses instead of raw dicts
    # Loss on the answers only, as the Unsloth chat notebooks do.
    trainer = train_on_responses_only(trainer, instruction_part=INSTRUCTION_PART, response_part=RESPONSE_PART)
    log(f"SFTTrainer: {args.steps} steps x batch {args.batch_size}, lr {args.lr}, "
        f"optimizer {trainer.args.optim}, bf16 {trainer.args.bf16}, max_length {args.max_seq_length}")
    t0 = time.time()
    result = trainer.train()
    train_seconds = time.time() - t0
    with contextlib.suppress(OSError):
        (args.out / "trainer").rmdir()  # save_strategy="no": the Trainer's output_dir stays empty
    losses = loss_logger.losses
    if losses:
        log(f"trained in {train_seconds:.1f}s: loss {losses[0][1]:.4f} (step {losses[0][0]}) -> "
            f"{losses[-1][1]:.4f} (step {losses[-1][0]}); mean {result.training_loss:.4f}")

    adapter_dir = args.out / "adapter"
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    base_ref = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    log(f"model.save_pretrained -> {adapter_dir} (base_model_name_or_path = {base_ref!r})")

    merged_dir, merge_method = None, None
    if not args.no_merge:
        merged_dir = args.out / "merged"
        merge_method = save_merged(FastLanguageModel, model, tokenizer, adapter_dir, merged_dir, args)
    del trainer, model
    return {
        "train_seconds": round(train_seconds, 1),
        "losses": losses,
        "train_loss_mean": result.training_loss,
        "adapter": str(adapter_dir),
        "adapter_base_model_name_or_path": base_ref,
        "merged": str(merged_dir) if merged_dir else None,
        "merge_method": merge_method,
        "unsloth_backend": "cpu" if os.environ.get("UNSLOTH_FORCE_CPU") == "1" or not torch.cuda.is_available() else "gpu",
    }


def save_merged(FastLanguageModel, model, tokenizer, adapter_dir: Path, merged_dir: Path, args) -> str:
    """save_pretrained_merged(merged_16bit); on Unsloth's CPU backend (no merge into 4-bit) reload
    the adapter over the 16-bit base and merge there."""
    import torch

    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    try:
        model.save_pretrained_merged(str(merged_dir), tokenizer, save_method="merged_16bit")
        log(f"model.save_pretrained_merged(save_method='merged_16bit') -> {merged_dir}")
        return "unsloth save_pretrained_merged (4-bit model)"
    except NotImplementedError as err:
        log(f"save_pretrained_merged on the 4-bit model is not supported here: {err}")
    log("FALLBACK merge: reloading the saved adapter over the 16-bit base "
        "(FastLanguageModel.from_pretrained(adapter, load_in_4bit=False, dtype=float32), i.e. PEFT "
        "merge_and_unload in float32) and calling save_pretrained_merged(merged_16bit) on that")
    model16, tok16 = FastLanguageModel.from_pretrained(
        model_name=str(adapter_dir), max_seq_length=args.max_seq_length, load_in_4bit=False,
        dtype=torch.float32, local_files_only=True,
    )
    model16.save_pretrained_merged(str(merged_dir), tok16, save_method="merged_16bit")
    del model16
    log(f"merged (16-bit base + adapter, saved {json.loads((merged_dir / 'config.json').read_text()).get('dtype')}) -> {merged_dir}")
    return "16-bit reload + save_pretrained_merged (PEFT merge_and_unload)"


# --------------------------------------------------------------------------- serving (sloth-serve)


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def serve_offline(args, base: Path, info: dict, questions: list[str], device: str) -> dict:
    from sloth_serve import LLM, SamplingParams

    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    llm = LLM(base, lora={args.name: info["adapter"]}, device=device)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in questions]
    samples: dict[str, list[str]] = {}
    plain = llm.generate(prompts, greedy)
    tuned = llm.generate(prompts, greedy, adapter=args.name)
    samples["base"] = [o.text for o in plain]
    samples[f"lora:{args.name}"] = [o.text for o in tuned]
    del llm
    if info.get("merged"):
        merged = LLM(info["merged"], device=device)
        samples["merged"] = [o.text for o in merged.generate(prompts, greedy)]
        del merged
    print()
    log(f"sloth-serve, offline: LLM({base.name}, lora={{{args.name!r}: adapter}}) and LLM(merged), greedy, "
        "questions not in the training data")
    for i, q in enumerate(questions):
        print(f"  Q: {q}")
        for key, texts in samples.items():
            print(f"    {key:>16} [{upper_share(texts[i]):4.0%} upper] {texts[i]!r}")
    print()
    shares = {k: round(sum(upper_share(t) for t in v) / len(v), 3) for k, v in samples.items()}
    log(f"share of upper-case letters in the answers: {shares}")
    return {"questions": questions, "samples": samples, "upper_share": shares}


def client_lines(args, base: Path, adapter: Path) -> str:
    url = f"http://{args.host}:{args.port}"
    rel = lambda p: os.path.relpath(p, Path.cwd()) if Path(p).is_relative_to(Path.cwd()) else str(p)  # noqa: E731
    return f"""\
# serve the base with the adapter hot-swappable by name (add more --lora NAME=PATH, or --lora-dir DIR):
python -m sloth_serve.cli --model {rel(base)} --lora {args.name}={rel(adapter)} --port {args.port}

curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{args.name}", "messages": [{{"role": "user", "content": "What does `json.dumps` do?"}}], "max_tokens": 48, "temperature": 0}}'

python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="unused")
reply = client.chat.completions.create(model="{args.name}", max_tokens=48, temperature=0,
    messages=[{{"role": "user", "content": "What does `json.dumps` do?"}}])
print(reply.choices[0].message.content)
PY"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    FastLanguageModel = import_unsloth(args.device)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if os.environ.get("UNSLOTH_FORCE_CPU") == "1":
        device = "cpu"
    base = (args.base or default_base()).resolve()
    if device == "cpu":
        # The demo model's matrices are 256 wide: a second thread buys little, and on shared cores
        # OpenMP's spin-waiting made 2-thread training steps 6-20x slower than 1 thread (measured here).
        threads = args.threads or (1 if base == default_base().resolve() else torch.get_num_threads())
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the --serve subprocess
    import transformers
    import trl
    import unsloth

    log(f"unsloth {unsloth.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}; device {device}, {torch.get_num_threads()} threads")

    questions = held_out(HELD_OUT_QUESTIONS, args.data)

    info = train(args, FastLanguageModel, base)
    info.update(serve_offline(args, base, info, questions, device))
    info["total_seconds"] = round(time.time() - _T0, 1)
    info["steps"], info["batch_size"], info["seed"], info["device"] = args.steps, args.batch_size, args.seed, device
    (args.out / "summary.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"done in {info['total_seconds']:.0f}s; summary -> {args.out / 'summary.json'}")

    lines = client_lines(args, base, Path(info["adapter"]))
    if not args.serve:
        print("\nTo serve it over HTTP (or rerun with --serve):\n\n" + lines + "\n")
        return 0
    print("\nStarting the server; call it with:\n\n" + lines + "\n", flush=True)
    cmd = [sys.executable, "-m", "sloth_serve.cli", "--model", str(base), "--lora", f"{args.name}={info['adapter']}",
           "--host", args.host, "--port", str(args.port), "--device", device]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        return subprocess.call(cmd, cwd=REPO, env=env)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
