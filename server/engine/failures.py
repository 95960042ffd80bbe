"""What a failed step means: some of its requests failed (SequenceError, or an error that running
each request alone pins down), the device ran out of memory, or the device itself faulted (the only
case where the engine cannot go on)."""

from __future__ import annotations

# Words of the errors after which the device (its context, hence every later kernel) cannot be
# trusted: CUDA reports asynchronous faults on whichever later call notices them.
_DEVICE_FAULT_WORDS = ("cuda error", "cublas_status", "cudnn_status", "device-side assert",
                       "illegal memory access", "illegal instruction", "unspecified launch failure", "nccl")


class SequenceError(Exception):
    """A step could not be prepared for some of its sequences: `failures` maps each of their
    request ids to why. Nothing was sampled for any sequence of the step."""

    def __init__(self, failures: dict[str, str]) -> None:
        super().__init__("; ".join(f"{rid}: {why}" for rid, why in failures.items()))
        self.failures = failures


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def is_device_fault(exc: BaseException) -> bool:
    """Whether `exc` says the device is broken rather than one request's input."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA faults
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc).lower()
    return any(word in text for word in _DEVICE_FAULT_WORDS)


def describe(exc: BaseException) -> str:
    """A one-line account of an exception for a client's error message (no traceback)."""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
