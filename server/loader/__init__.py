"""Model and adapter loading, and the embedded demo model shipped inside the package."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_MODEL = DEMO_DIR / "base"
DEMO_ADAPTER = DEMO_DIR / "adapter-upper"
DEMO_MERGED = DEMO_DIR / "merged-upper"
DEMO_DRAFT = DEMO_DIR / "draft"  # a 1-layer draft model trained like the demo model (scripts/train_draft_model.py)
