#!/usr/bin/env python3
"""Build the demo model's draft model under ``server/loader/demo/draft/``: a smaller model trained the
way the demo model was, for speculative decoding (``--speculative-model``).

Same tokenizer (the committed ``demo/base/tokenizer.json``, read, not retrained), same corpus
(``scripts/train_demo_model.py``'s: the standard library's docstrings and the chat examples made
from them, in the same shuffled order, 2% held out), same training loop (AdamW, cosine schedule,
seeded random windows, the weights of the best held-out evaluation kept). Only the shape and the
budget differ: one decoder layer, 128 wide (0.72M parameters, 1.4 MB in bfloat16, against
the demo model's 4 layers x 256 and 3.4M), trained for a few minutes on a CPU.

``--distill W`` adds W times the KL divergence from the demo model's next-token distribution to the
loss (its logits computed on the same windows): the draft then learns what the model it drafts for
would say rather than only the corpus, which is what acceptance rewards. It doubles the cost of a
step; the committed draft was trained without it (``--steps 400 --threads 2``, the defaults
otherwise: 400 steps x 16 x 256 tokens, about 2 epochs; held-out loss 3.97 nats/token at the last
step, against the demo model's 3.15; 36 minutes on a 2-core CPU shared with other jobs, about 6
alone). bench/results/spec-acceptance-cpu.md records its acceptance.

    python scripts/train_draft_model.py                     # CPU, a few minutes
    python scripts/train_draft_model.py --steps 600 --distill 1.0

Reproducibility: fixed seeds and data order, as for the demo model; the corpus depends on the
Python version whose standard library is read (the committed one: CPython 3.11.7, as the demo
model's); a rerun with the same library versions and thread count should give the same weights
(not checked bit for bit).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_model as demo  # its corpus, config and training loop

DRAFT_CONFIG = {
    **demo.MODEL_CONFIG,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def corpus(tokenizer_path: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The demo model's base corpus (train, held out), encoded with its committed tokenizer."""
    from tokenizers import Tokenizer

    plain, chats = demo.build_texts(seed)
    docs = [d + demo.ENDOFTEXT for d in plain]
    docs += [
        demo.render_chat([*msgs, {"role": "assistant", "content": a}]) + demo.ENDOFTEXT for msgs, a in chats
    ]
    random.Random(seed + 1).shuffle(docs)
    tok = Tokenizer.from_file(str(tokenizer_path))
    encoded = [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(docs)]
    train = np.concatenate([e for i, e in enumerate(encoded) if i % 50 != 0])
    held_out = np.concatenate([e for i, e in enumerate(encoded) if i % 50 == 0])
    return train, held_out


def kl_to(teacher, weight: float):  # type: ignore[no-untyped-def]
    """The extra loss of distillation: weight * KL(teacher's next-token distribution || the draft's)."""
    import torch
    import torch.nn.functional as F

    def extra(x, logits):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=x).logits.float(), dim=-1)
        own = F.log_softmax(logits.float(), dim=-1)
        return weight * F.kl_div(
            own.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"
        )

    return extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--base", type=Path, default=demo.DEFAULT_OUT / "base", help="the demo model (tokenizer, teacher)"
    )
    ap.add_argument("--out", type=Path, default=demo.DEFAULT_OUT / "draft")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument(
        "--distill", type=float, default=0.0, help="weight of KL(demo model || draft) in the loss"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    ids, val_ids = corpus(args.base / "tokenizer.json", args.seed)
    demo.log(f"corpus: {len(ids):,} tokens (+{len(val_ids):,} held out) in {time.time() - t0:.0f}s")
    demo.seed_all(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**DRAFT_CONFIG))
    model.config._attn_implementation = "sdpa"
    demo.log(f"draft: {sum(p.numel() for p in model.parameters()):,} parameters")
    extra = None
    if args.distill:
        teacher = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
        extra = kl_to(teacher, args.distill)
    secs = demo.train_loop(
        model,
        list(model.parameters()),
        ids,
        None,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=0.1,
        device=torch.device("cpu"),
        seed=args.seed,
        tag="draft",
        val_ids=val_ids,
        eval_every=args.eval_every,
        extra_loss=extra,
    )
    demo.log(f"draft trained in {secs:.0f}s")

    if args.out.exists():
        shutil.rmtree(args.out)
    model = model.to(dtype=torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(args.out, safe_serialization=True)
    demo.write_generation_config(args.out)
    demo.add_legacy_rope_theta(args.out)
    (args.out / "chat_template.jinja").unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(args.base / name, args.out / name)
    card = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "distill": args.distill,
        "seed": args.seed,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "seconds": round(secs),
    }
    demo.log(f"wrote {args.out}: {json.dumps(card)}")


if __name__ == "__main__":
    main()
