#!/usr/bin/env python3
"""Build the embedded demo model under ``server/loader/demo/``.

The demo model is a tiny Llama-architecture causal LM (about 3.4M parameters)
that ships inside the repository, so that the server, its tests and its docs
have a real Hugging Face checkpoint to load without downloading anything.
This script writes exactly the committed files::

    server/loader/demo/
      base/            LlamaForCausalLM, bfloat16 safetensors, byte-level BPE
                       tokenizer (vocab 4096) with a ChatML chat template
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  special_tokens_map.json
      adapter-upper/   PEFT LoRA adapter (r=8, alpha=16, all 7 linear
                       projections) trained to answer chat questions in
                       UPPER CASE; float32
        adapter_config.json  adapter_model.safetensors
      merged-upper/    the adapter merged into the base (merge computed in
                       float32, saved as bfloat16), same tokenizer files

``adapter_config.json`` stores ``base_model_name_or_path = "../base"``: a path
relative to the adapter folder itself (resolve it against the adapter's own
directory; it is not relative to the working directory, and not a Hub id).

Training text (all offline): the docstrings of the running interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``, files in sorted order,
extracted with ``ast``; ``test``/``tests`` and ``site-packages`` skipped), as
plain text ending in ``<|endoftext|>``, plus chat examples built from them
(user: "What does `json.dumps` do?" -> assistant: the docstring's first
paragraph) in the ChatML template.  The adapter is trained on the same chat
examples with the assistant answers upper-cased (loss on the answers only).

How to run (from the repository root)::

    python scripts/train_demo_model.py                 # everything, --device auto
    python scripts/train_demo_model.py --stages prepare            # CPU, ~1 min
    python scripts/train_demo_model.py --stages base,adapter,merge --device cuda

Stages: ``prepare`` (extract the text, train the tokenizer, write the tokenizer
files and the token-id corpus ``<work-dir>/corpus.npz``), ``base`` (train the
base model), ``adapter`` (train the LoRA adapter on the saved bf16 base),
``merge`` (write ``merged-upper``).  ``--work-dir`` (default
``build/demo-model``, git-ignored) holds the intermediate corpus so that the
training stages can run on another machine than ``prepare``.

How long it takes: ``prepare`` about 5 seconds.  On one NVIDIA H200 the base
model (2000 steps x 32 x 512 tokens, about 33M tokens, ~43 epochs of the
768k-token corpus, held-out loss measured every 100 steps) trains in about 55 s
and the adapter (600 steps x 32 x 512) in about 22 s; the merge takes a few
seconds; the whole GPU run about 95 s.  On a 2-core CPU one base step at the
default batch takes about 3.5 s, so the defaults would take about 2.5 hours
there: pass e.g. ``--base-steps 500 --adapter-steps 150`` for a comparable but
not identical model in about 40 minutes.

The tiny corpus is learnt by heart quickly: the held-out loss bottoms out long
before the last step and then rises, so the base stage keeps the weights of the
evaluation with the lowest held-out loss (deterministic early stopping; for the
committed model step 500 of 2000, held-out loss 3.15 nats/token).

Committed model provenance: ``prepare`` on CPython 3.11.7 (tokenizers 0.23.3);
``base``, ``adapter`` and ``merge`` on one NVIDIA H200 (torch 2.11.0+cu130,
transformers 5.17.0, peft 0.21.0), with the defaults above and
``--device cuda``.  Re-running ``merge`` on CPU (torch 2.13.0, peft 0.21.2)
reproduces ``merged-upper/model.safetensors`` byte for byte.

Reproducibility: fixed seeds (``--seed``, default 0), deterministic data order
(sorted files, seeded shuffles and window offsets).  The corpus depends on the
Python version whose stdlib is read, and GPU training is not bitwise
deterministic across GPUs / library versions, so a rerun gives an equivalent
but not byte-identical model.

Requires: torch, transformers (>= 5), peft, tokenizers, safetensors, numpy.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "server" / "loader" / "demo"
DEFAULT_WORK = REPO / "build" / "demo-model"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2
VOCAB_SIZE = 4096

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    hidden_act="silu",
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    initializer_range=0.02,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=None,
    # EOS is <|im_end|> (2) and padding <|endoftext|> (0), distinct as Unsloth requires of a pad
    # token on CUDA (as in Qwen's tokenizers); generation_config stops on both.
    eos_token_id=2,
    pad_token_id=0,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant that knows the Python standard library.",
    "Answer briefly.",
]
QUESTIONS_ANY = [
    "What does `{n}` do?",
    "What is `{n}`?",
    "Explain `{n}`.",
    "Describe `{n}`.",
    "Tell me about `{n}`.",
    "What does {n} do?",
    "What is {n} for?",
]
QUESTIONS_FUNC = ["What does the `{n}` function do?", "How does `{n}` work?"]
QUESTIONS_CLASS = ["What is the `{n}` class?", "What is the {n} class for?"]
QUESTIONS_MODULE = ["What is the `{n}` module?", "What is the {n} module for?", "Describe the `{n}` module."]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


def stdlib_docstrings() -> list[tuple[str, str, str]]:
    """(qualified name, kind, docstring) for every docstring in the stdlib, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"test", "tests", "site-packages", "dist-packages", "__pycache__"}
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())

    out: list[tuple[str, str, str]] = []
    for path in files:
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(not p.isidentifier() for p in parts):
            continue
        module = ".".join(parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}.{child.name}"
                    doc = ast.get_docstring(child)
                    kind = "class" if isinstance(child, ast.ClassDef) else "function"
                    if doc:
                        out.append((name, kind, doc))
                    if isinstance(child, ast.ClassDef):
                        visit(child, name)

        doc = ast.get_docstring(tree)
        if doc:
            out.append((module, "module", doc))
        visit(tree, module)
    return out


def first_paragraph(doc: str, max_chars: int = 400) -> str | None:
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    para = " ".join(para.split())
    if len(para) < 20 or not re.search(r"[a-z]{3}", para):
        return None
    if len(para) > max_chars:
        cut = para.rfind(". ", 0, max_chars)
        if cut < 40:
            return None
        para = para[: cut + 1]
    return para


def is_public(name: str) -> bool:
    return not any(
        p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in name.split(".")
    )


def render_chat(messages: list[dict[str, str]]) -> str:
    """Same string as the CHAT_TEMPLATE renders (without a generation prompt)."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def build_texts(seed: int) -> tuple[list[str], list[tuple[list[dict[str, str]], str]]]:
    """Plain docstring documents, and chat examples as (prompt messages, answer)."""
    rng = random.Random(seed)
    docs = stdlib_docstrings()
    plain: list[str] = []
    chats: list[tuple[list[dict[str, str]], str]] = []
    seen_questions: set[str] = set()
    for name, kind, doc in docs:
        plain.append(doc.strip())
        if not is_public(name) or "__" in name:
            continue
        answer = first_paragraph(doc)
        if answer is None:
            continue
        extra = {"function": QUESTIONS_FUNC, "class": QUESTIONS_CLASS, "module": QUESTIONS_MODULE}[kind]
        pool = QUESTIONS_ANY + extra * 2 if kind != "module" else QUESTIONS_MODULE
        question = rng.choice(pool).format(n=name)
        if question in seen_questions:
            continue
        seen_questions.add(question)
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": question})
        chats.append((messages, answer))
    return plain, chats


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def write_tokenizer_files(tok, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "extra_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "additional_special_tokens": [IM_START, IM_END],
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def stage_prepare(args) -> None:
    t0 = time.time()
    plain, chats = build_texts(args.seed)
    log(f"python {sys.version.split()[0]}: {len(plain)} docstrings, {len(chats)} chat examples")

    tok_texts = plain + [m["content"] for msgs, _ in chats for m in msgs] + [a for _, a in chats]
    tok_texts += ["system", "user", "assistant"]
    tok = train_tokenizer(tok_texts)
    write_tokenizer_files(tok, args.out / "base")
    log(f"tokenizer trained ({tok.get_vocab_size()} tokens) in {time.time() - t0:.1f}s")

    # Base corpus: plain docstrings + chat examples (full conversations), shuffled, each doc
    # followed by <|endoftext|>; loss on every token.
    base_docs = [d + ENDOFTEXT for d in plain]
    base_docs += [render_chat([*msgs, {"role": "assistant", "content": a}]) + ENDOFTEXT for msgs, a in chats]
    random.Random(args.seed + 1).shuffle(base_docs)
    encoded = [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(base_docs)]
    base_ids = np.concatenate([e for i, e in enumerate(encoded) if i % 50 != 0])
    base_val_ids = np.concatenate([e for i, e in enumerate(encoded) if i % 50 == 0])  # 2% held out

    # Adapter corpus: the same chat examples, answers upper-cased; loss only on the answer
    # tokens (and the closing <|im_end|>).
    order = list(range(len(chats)))
    random.Random(args.seed + 2).shuffle(order)
    ad_ids, ad_mask = [], []
    for i in order:
        msgs, answer = chats[i]
        prompt = render_chat(msgs) + f"{IM_START}assistant\n"
        completion = f"{answer.upper()}{IM_END}\n{ENDOFTEXT}"
        p, c = tok.encode(prompt).ids, tok.encode(completion).ids
        ad_ids.append(np.asarray(p + c, dtype=np.uint16))
        ad_mask.append(np.asarray([0] * len(p) + [1] * (len(c) - 1) + [0], dtype=np.uint8))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.work_dir / "corpus.npz",
        base_ids=base_ids,
        base_val_ids=base_val_ids,
        adapter_ids=np.concatenate(ad_ids),
        adapter_mask=np.concatenate(ad_mask),
    )
    with open(args.work_dir / "chat_examples.jsonl", "w", encoding="utf-8") as f:
        for msgs, a in chats:
            f.write(json.dumps({"messages": msgs, "answer": a}, ensure_ascii=False) + "\n")
    log(
        f"corpus: base {len(base_ids):,} tokens (+{len(base_val_ids):,} held out), adapter {sum(len(x) for x in ad_ids):,} tokens "
        f"-> {args.work_dir / 'corpus.npz'} ({time.time() - t0:.1f}s)"
    )


# --------------------------------------------------------------------------- training


def pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def train_loop(
    model,
    params,
    ids,
    mask,
    *,
    steps,
    batch_size,
    seq_len,
    lr,
    warmup,
    weight_decay,
    device,
    seed,
    tag,
    val_ids=None,
    eval_every=100,
    extra_loss=None,
):
    """AdamW + cosine schedule on windows of a token stream starting at seeded random offsets.

    Random starts (rather than fixed chunks) keep the tiny model from memorising tokens by their
    absolute position.  With ``val_ids`` the held-out loss is measured every ``eval_every`` steps and
    the weights of the best evaluation are restored at the end (deterministic early stopping).
    ``extra_loss(x, logits)`` is added to the training loss (scripts/train_draft_model.py distils
    the demo model into its draft with it); the held-out loss stays the plain cross-entropy.
    """
    import torch

    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask_t = None if mask is None else torch.from_numpy(mask.astype(np.bool_))
    gen = torch.Generator().manual_seed(seed)
    use_bf16 = device.type == "cuda"
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def loss_of(x, y):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100
        )
        if extra_loss is not None and model.training:
            loss = loss + extra_loss(x, logits)
        return loss

    val_batches = []
    if val_ids is not None:
        v = torch.from_numpy(val_ids.astype(np.int64))
        n = min((len(v) - 1) // seq_len, 64)
        chunks = torch.stack([v[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
        val_batches = [chunks[i : i + 16] for i in range(0, n, 16)]

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [loss_of(c[:, :-1].to(device), c[:, 1:].to(device)).item() for c in val_batches]
        model.train()
        return sum(losses) / len(losses)

    model.train()
    t0, running, best = time.time(), None, (float("inf"), -1, None)
    offsets = torch.arange(seq_len + 1)
    log(
        f"{tag}: {len(ids_t):,} tokens (~{steps * batch_size * seq_len / len(ids_t):.0f} epochs), "
        f"{steps} steps x {batch_size} x {seq_len}"
    )
    for step in range(steps):
        starts = torch.randint(0, len(ids_t) - seq_len - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + offsets[None, :]
        chunk = ids_t[idx]
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        if mask_t is not None:
            y[~mask_t[idx][:, 1:]] = -100
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = step == steps - 1
        if step % eval_every == 0 or last:
            cur = loss.item()
            running = cur if running is None else 0.8 * running + 0.2 * cur
            msg = f"{tag} step {step:5d}/{steps} loss {cur:.3f} (avg {running:.3f}) lr {lr_at(step):.2e}"
            if val_batches and (step > 0 or last):
                val = evaluate()
                msg += f" val {val:.3f}"
                if val < best[0]:
                    best = (val, step, {k: t.detach().clone() for k, t in model.state_dict().items()})
            log(f"{msg} {time.time() - t0:.0f}s")
    if best[2] is not None:
        model.load_state_dict(best[2])
        log(f"{tag}: kept the weights of step {best[1]} (val loss {best[0]:.3f})")
    model.eval()
    return time.time() - t0


def load_corpus(args):
    path = args.work_dir / "corpus.npz"
    if not path.exists():
        sys.exit(f"{path} is missing: run the 'prepare' stage first")
    return np.load(path)


def write_generation_config(folder: Path) -> None:
    gen = {
        "bos_token_id": None,
        "eos_token_id": [SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(ENDOFTEXT)],
        "pad_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
        "do_sample": False,
        "max_new_tokens": 256,
    }
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def add_legacy_rope_theta(folder: Path) -> None:
    """transformers 5 writes rope_parameters only; also write the flat rope_theta older readers expect."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rope_theta"] = MODEL_CONFIG["rope_theta"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def stage_base(args, device) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_all(args.seed)
    corpus = load_corpus(args)
    config = LlamaConfig(**MODEL_CONFIG)
    model = LlamaForCausalLM(config).to(device)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base model: {n_params:,} parameters on {device}")
    secs = train_loop(
        model,
        [p for p in model.parameters()],
        corpus["base_ids"],
        None,
        steps=args.base_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.base_lr,
        warmup=100,
        weight_decay=0.1,
        device=device,
        seed=args.seed,
        tag="base",
        val_ids=corpus["base_val_ids"],
    )
    log(f"base trained in {secs:.0f}s")
    folder = args.out / "base"
    model = model.to("cpu", dtype=torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder, safe_serialization=True)
    write_generation_config(folder)  # overwrite transformers' default one
    add_legacy_rope_theta(folder)
    for stray in ("chat_template.jinja",):
        (folder / stray).unlink(missing_ok=True)


def load_base_fp32(args, device):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.out / "base", dtype=torch.float32).to(device)


def stage_adapter(args, device) -> None:
    from peft import LoraConfig, get_peft_model

    seed_all(args.seed + 10)
    corpus = load_corpus(args)
    base = load_base_fp32(args, device)  # the saved bf16 weights, upcast: what inference sees
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"adapter: {sum(p.numel() for p in params):,} trainable parameters")
    secs = train_loop(
        model,
        params,
        corpus["adapter_ids"],
        corpus["adapter_mask"],
        steps=args.adapter_steps,
        batch_size=args.adapter_batch_size,
        seq_len=args.seq_len,
        lr=args.adapter_lr,
        warmup=50,
        weight_decay=0.0,
        device=device,
        seed=args.seed + 10,
        tag="adapter",
    )
    log(f"adapter trained in {secs:.0f}s")
    folder = args.out / "adapter-upper"
    if folder.exists():
        shutil.rmtree(folder)
    model.to("cpu").save_pretrained(folder, safe_serialization=True)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "../base"  # relative to this adapter folder
    cfg["target_modules"] = sorted(cfg["target_modules"])  # peft stores a set: fix the order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)


def stage_merge(args) -> None:
    import torch
    from peft import PeftModel

    base = load_base_fp32(args, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(args.out / "adapter-upper"))
    merged = model.merge_and_unload()  # in float32
    merged = merged.to(torch.bfloat16)
    merged.config.dtype = torch.bfloat16
    folder = args.out / "merged-upper"
    if folder.exists():
        shutil.rmtree(folder)
    merged.save_pretrained(folder, safe_serialization=True)
    add_legacy_rope_theta(folder)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        shutil.copy(args.out / "base" / name, folder / name)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    log(f"merged -> {folder}")


def sample(args, device) -> None:
    """Greedy samples from what was written (a quick look, also printed after training)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.out / "base")
    for name in ("base", "merged-upper"):
        folder = args.out / name
        if not (folder / "model.safetensors").exists():
            continue
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        prompts = [
            "Return the",
            tok.apply_chat_template(
                [{"role": "user", "content": "What does `json.dumps` do?"}],
                tokenize=False,
                add_generation_prompt=True,
            ),
        ]
        for p in prompts:
            ids = torch.tensor([tok.encode(p, add_special_tokens=False)], device=device)
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=40, do_sample=False)
            log(f"{name} | {p!r} -> {tok.decode(out[0, ids.shape[1] :])!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--stages",
        default="prepare,base,adapter,merge",
        help="comma-separated subset of prepare,base,adapter,merge (default: all)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--base-steps", type=int, default=2000)
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--adapter-steps", type=int, default=600)
    ap.add_argument("--adapter-batch-size", type=int, default=32)
    ap.add_argument("--adapter-lr", type=float, default=2e-3)
    ap.add_argument("--no-sample", action="store_true", help="skip the greedy samples at the end")
    args = ap.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - {"prepare", "base", "adapter", "merge"}
    if unknown:
        ap.error(f"unknown stages: {sorted(unknown)}")

    t0 = time.time()
    if "prepare" in stages:
        stage_prepare(args)
    if {"base", "adapter", "merge"} & set(stages):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = pick_device(args.device)
        log(
            f"torch {torch.__version__}, device {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        )
        if "base" in stages:
            stage_base(args, device)
        if "adapter" in stages:
            stage_adapter(args, device)
        if "merge" in stages:
            stage_merge(args)
        if not args.no_sample:
            sample(args, device)
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
