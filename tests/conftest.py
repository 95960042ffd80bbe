import sys
from pathlib import Path

# Tests import `server`, `kernels` and the unit-test factories from the checkout.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))
