"""What our Triton kernels ask of a GPU, learned without one: `compiled_launches` compiles each launch
the wrappers make (CPU tensors of the real shapes, nothing runs) for an NVIDIA target through Triton's
own ptxas, and `KernelResources` reads each compiled kernel's shared memory, registers and stack
(spills). The interpreter the CPU tests use cannot see these limits; a launch past them fails on the
GPU alone (OutOfResources)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

SM90_SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on an H100 / H200 (227 KB)
SM90 = ("cuda", 90, 32)  # the H200's target: backend, compute capability, warp size


@dataclass(frozen=True, slots=True)
class KernelResources:
    """One compiled kernel: its constexprs and launch options, shared memory per block (bytes),
    registers per thread, and stack bytes per thread (ptxas puts spilled registers there)."""

    kernel: str
    config: str
    shared: int
    registers: int
    stack: int

    def problems(self, shared_limit: int = SM90_SHARED_LIMIT, stack_limit: int = 0) -> list[str]:
        out = []
        if self.shared > shared_limit:
            out.append(f"{self.kernel}[{self.config}] needs {self.shared} bytes of shared memory, "
                       f"past the {shared_limit} a block may use")
        if self.stack > stack_limit:
            out.append(f"{self.kernel}[{self.config}] spills: {self.stack} bytes of stack per thread "
                       f"(limit {stack_limit})")
        return out


def toolchain_problem() -> str | None:
    """Why this Triton cannot compile for an NVIDIA target here (None when it can): the NVIDIA
    backend, its ptxas and cuobjdump, and the compile API this module calls."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"this Triton build has no NVIDIA compile path ({e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 replaces the compiler with the interpreter"
    try:
        get_ptxas(90)
    except Exception as e:  # a missing binary raises RuntimeError or FileNotFoundError by version
        return f"this Triton build has no usable ptxas ({e})"
    if not os.path.isfile(_cuobjdump()):
        return "this Triton build ships no cuobjdump (registers and stack are read from the cubin)"
    if not hasattr(JITFunction, "_pack_args"):
        return f"Triton {triton.__version__}'s JITFunction differs from the 3.6 API this module uses"
    return None


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def _cubin_usage(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers, stack bytes) of the kernel `name` in a cubin, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    found = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump reported no function {name}: {text}")
    return int(found.group(1)), int(found.group(2))


def _config(constexprs: dict[Any, Any], options: Any) -> str:
    consts = [f"{k}={v}" for k, v in constexprs.items() if isinstance(v, int | bool | str)]
    return ", ".join([*consts, f"warps={options.num_warps}", f"stages={options.num_stages}"])


@contextlib.contextmanager
def compiled_launches(target: tuple[str, int, int] = SM90) -> Iterator[list[KernelResources]]:
    """Inside, a Triton launch (`kernel[grid](...)`) compiles the kernel for `target` and appends its
    resources to the list yielded, instead of running it; the wrappers' torch work runs on the CPU
    tensors they are given (their outputs stay unwritten). The same kernel with the same argument
    types, constexprs and options is listed once."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    gpu = GPUTarget(*target)
    backend = make_backend(gpu)
    found: list[KernelResources] = []
    seen: set[tuple[str, str, str]] = set()
    original = JITFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        named = {self.params[path[0]].name: v for path, v in constexprs.items() if len(path) == 1}
        config = _config(named, options)
        key = (self.fn.__name__, config, str(signature))  # the argument types too (bf16 or fp32 tensors)
        if key in seen:
            return
        seen.add(key)
        kernel = compile(ASTSource(self, signature, constexprs, attrs), target=gpu, options=options.__dict__)
        registers, stack = _cubin_usage(kernel.asm["cubin"], kernel.metadata.name)
        found.append(KernelResources(self.fn.__name__, config, kernel.metadata.shared, registers, stack))

    JITFunction.run = run  # type: ignore[method-assign]
    try:
        yield found
    finally:
        JITFunction.run = original  # type: ignore[method-assign]
