"""Adapter ids with several front ends on one engine (--api-server-count): the --lora adapters take
the same ids in every front end (named in the same order), and what a front end loads while serving
(a --lora-dir adapter on a request, or one loaded through /v1/load_lora_adapter, pinned or not) takes
ids of its own range, so two front ends never give one id to different folders."""

from __future__ import annotations

from sloth_serve.adapters import DYNAMIC_ID_SPAN, AdapterRegistry, dynamic_ids_from
from sloth_serve.loader import DEMO_ADAPTER


def test_one_front_end_counts_every_adapter_from_one() -> None:
    registry = AdapterRegistry()
    ids = [registry.prepare(n, DEMO_ADAPTER, pinned=p).adapter_id for n, p in [("a", True), ("b", False), ("c", True)]]
    assert dynamic_ids_from(None) is None and ids == [1, 2, 3]


def test_front_ends_share_pinned_ids_and_never_share_dynamic_ones() -> None:
    fronts = [AdapterRegistry(dynamic_ids=dynamic_ids_from(i)) for i in range(3)]
    pinned = [[r.prepare(n, DEMO_ADAPTER, pinned=True, at_startup=True).adapter_id for n in ("a", "b")]
              for r in fronts]
    assert pinned == [[1, 2]] * 3  # --lora: the engine loads each folder once under its id
    # A --lora-dir adapter on a request, then one through /v1/load_lora_adapter (pinned, while serving).
    dynamic = [[r.prepare("x", DEMO_ADAPTER).adapter_id, r.prepare("y", DEMO_ADAPTER, pinned=True).adapter_id]
               for r in fronts]
    assert dynamic == [[(i + 1) * DYNAMIC_ID_SPAN, (i + 1) * DYNAMIC_ID_SPAN + 1] for i in range(3)]
    assert fronts[0].prepare("late", DEMO_ADAPTER, pinned=True, at_startup=True).adapter_id == 3
    assert max(max(d) for d in dynamic) < 2**31  # int32 wherever the engine stores an id
