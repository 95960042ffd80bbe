"""Summarize a py-spy raw profile (`py-spy record --threads -f raw`): samples per thread, and per
thread the functions with the most samples (inclusive, and as the innermost frame).

    python bench/profile_summary.py serve-prof.txt [--top 30]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

IDLE_LEAVES = ("select", "epoll", "poll", "wait", "sleep", "acquire", "_recv", "accept")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    per_thread: dict[str, int] = collections.Counter()
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in args.profile.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        if not frames or any(word in frames[-1].split(" ")[0].lower() for word in IDLE_LEAVES):
            continue
        n = int(count)
        name = thread.split(":", 1)[-1].strip() or thread
        per_thread[name] += n
        for frame in set(frames):
            inclusive[name][frame] += n
        leaves[name][frames[-1]] += n
    total = sum(per_thread.values())
    print(f"busy samples: {total}")
    for name, n in sorted(per_thread.items(), key=lambda kv: -kv[1]):
        print(f"\n== {name}: {n} samples ({100 * n / max(total, 1):.1f}%)")
        print("-- inclusive")
        for frame, k in inclusive[name].most_common(args.top):
            print(f"{k:7d} {100 * k / n:5.1f}%  {frame[:150]}")
        print("-- innermost")
        for frame, k in leaves[name].most_common(args.top // 2):
            print(f"{k:7d} {100 * k / n:5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    main()
