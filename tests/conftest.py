import os
import sys
import tempfile
from pathlib import Path

# Tests import `bench` and the unit-test factories from the checkout (`sloth_serve` and `sloth_kernels`
# come from the install, or from links on PYTHONPATH: scripts/import_names.sh).
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


def _exact_bitsandbytes_cpu_dequantize() -> None:
    """bitsandbytes 0.50's CPU kernel for `dequantize_4bit` (its C++ library, used on CPUs with AVX-512)
    takes each row of the weight as whole blocks: for a weight whose rows are not a multiple of the
    blocksize (the tiny test models' 32- and 96-wide rows; the format's blocks run across rows) it
    returns wrong values, errors of 0.5 where NF4's own are 0.1, so every reference built on it (a
    dequantized model, Unsloth's CPU `for_inference`, which dequantizes through it) is wrong there.
    Where this machine's kernel gives other values than bitsandbytes' own PyTorch implementation
    of the format, the CPU kernel is replaced by that implementation for the test run (sloth-serve's
    engine reads the 4-bit bytes itself and never calls it)."""
    try:
        import bitsandbytes.functional as bnbf
        import bitsandbytes.nn.modules as bnb_modules
        import torch
        from bitsandbytes.backends.default import ops as default_ops
    except ImportError:
        return
    # On CPUs with AVX-512 BF16, Linear4bit repacks its weight at the first eval forward and computes in
    # bfloat16 whatever the model's dtype: a float32 reference (Unsloth's CPU model) would differ from a
    # float32 run by bfloat16 rounding. The references compute as on other CPUs.
    bnb_modules.has_avx512bf16 = lambda: False
    weight = torch.linspace(-1.0, 1.0, 64 * 32).reshape(64, 32)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    code = state.code.to(torch.float32)
    exact = default_ops._dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), state.absmax, code, 64,
                                                 weight.shape, torch.float32)
    if torch.equal(bnbf.dequantize_4bit(packed, state), exact):
        return

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):  # bitsandbytes' op signature
        from bitsandbytes.backends.utils import _get_4bit_code

        code = _get_4bit_code(quant_type, A.device)
        return default_ops._dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax, code, blocksize,
                                                    shape, dtype)

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
    assert torch.equal(bnbf.dequantize_4bit(packed, state), exact)


_exact_bitsandbytes_cpu_dequantize()
