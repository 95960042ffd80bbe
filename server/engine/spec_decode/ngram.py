"""N-gram (prompt lookup) proposals: where the sequence's last n tokens occurred before, propose the
tokens that followed them. No model: quoting, editing and code workloads repeat their context."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(token_ids: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the latest earlier occurrence of the longest suffix
    of `token_ids` of min_n..max_n tokens; [] when no such suffix occurred before."""
    length = len(token_ids)
    if num_tokens < 1 or length < min_n + 1:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Window i covers tokens [i, i + n); the token after it exists for every i here (the last
        # token is left out), which also leaves the suffix itself out.
        windows = sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return token_ids[start : start + num_tokens]
    return []
