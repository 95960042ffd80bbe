import os
import sys
import tempfile
from pathlib import Path

# Tests import `server`, `kernels` and the unit-test factories from the checkout.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

# Unsloth writes generated modules into UNSLOTH_COMPILE_LOCATION (default: the working directory).
# Under pytest-xdist two workers may load models at once: each gets its own folder, outside the
# checkout, so they never read each other's half-written files (servers they start inherit it).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault(
    "UNSLOTH_COMPILE_LOCATION",
    str(Path(tempfile.gettempdir()) / f"sloth-tests-unsloth-cache-{_WORKER}"),
)
