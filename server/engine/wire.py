"""The messages between a front end and its engine, and their encoding (msgpack, by msgspec).

Commands go to the engine: requests as token ids and SamplingParams (a structured-output spec
travels as its JSON schema; the engine compiles its own grammar), adapters as ids and folders.
Events come back: a step's outputs with its StepStats, replies to adapter calls, and death. The
same messages run between threads (in-process engine) and between processes (engine process)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgspec

from ..startup_clock import Phase
from .mm_inputs import MultiModalInputs
from .outputs import EngineInfo, RequestOutput, StepStats
from .sampling_params import SamplingParams
from .sequence import FinishReason

# --- front end -> engine ------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: int = 0
    eos_token_ids: frozenset[int] | None = None  # the request's own (an adapter's); None: the model's
    mm: MultiModalInputs | None = None  # the prompt's images (their pixels cross as raw tensor bytes)
    system_prompt_end: int = 0  # where the prompt's system part ends (state snapshots); 0: unknown


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    reason: FinishReason = FinishReason.ABORT


class AddLora(msgspec.Struct, tag=True, array_like=True):
    call_id: int  # the Reply carries it back
    adapter_id: int
    name: str
    path: str  # the adapter folder; the engine reads it
    # Served under its name by every front end (--lora and /v1/load_lora_adapter): with several front
    # ends the others learn of it (AdapterNamed) and a second folder under the name is refused. A
    # --lora-dir adapter loaded on a request is each front end's own.
    shared: bool = False


class RemoveLora(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    adapter_id: int


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


Command = AddRequest | Abort | AddLora | RemoveLora | Shutdown

# --- engine -> front end ------------------------------------------------------------------------


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    """Outputs (of a step, or of requests refused before any step) and the records of the steps
    they came from; a refusal has none (the metrics count steps' outputs only)."""

    outputs: list[RequestOutput]
    stats: list[StepStats] = []


class Reply(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    result: int | None = None
    error: str | None = None
    is_value_error: bool = False  # the caller's mistake (a 400), not the engine's
    # What the call timed: the first adapter's load recaptures the CUDA graphs and compiles the LoRA
    # kernels (an engine process's, for the front end's start-up summary).
    startup_phases: tuple[Phase, ...] = ()
    # A --lora adapter another front end unloaded before this one, still starting, loaded it
    # (several front ends): it is not loaded again, and this front end does not serve it.
    withdrawn: bool = False


class AdapterNamed(msgspec.Struct, tag=True, array_like=True):
    """Another front end loaded a shared adapter (several front ends): serve `name` as `adapter_id`."""

    name: str
    adapter_id: int
    path: str
    rank: int


class AdapterUnnamed(msgspec.Struct, tag=True, array_like=True):
    """Another front end unloaded the shared adapter: `name` no longer serves `adapter_id`."""

    name: str
    adapter_id: int


class Dead(msgspec.Struct, tag=True, array_like=True):
    """The engine cannot go on: why, and the error outputs that end every request it had."""

    reason: str
    outputs: list[RequestOutput] = []


class Ready(msgspec.Struct, tag=True, array_like=True):
    info: EngineInfo


class LoadFailed(msgspec.Struct, tag=True, array_like=True):
    message: str


Event = StepOutputs | Reply | AdapterNamed | AdapterUnnamed | Dead | Ready | LoadFailed


def for_wire(params: SamplingParams) -> SamplingParams:
    """The parameters without a grammar compiled in this process (the engine compiles its own)."""
    spec = params.structured
    if spec is None or spec.compiled is None:
        return params
    return replace(params, structured=replace(spec, compiled=None))


TENSOR_EXT = 1  # msgpack extension type of a torch tensor: "dtype:shape" header, then its raw bytes


def _encode_extra(obj: Any) -> Any:
    if callable(getattr(obj, "items", None)):  # Mapping types msgspec does not know (logit_bias)
        return dict(obj.items())
    if type(obj).__name__ == "Tensor" and hasattr(obj, "untyped_storage"):  # image pixels
        tensor = obj.detach().cpu().contiguous()
        header = f"{str(tensor.dtype).removeprefix('torch.')}:{','.join(map(str, tensor.shape))}".encode()
        data = tensor.reshape(-1).view(torch_module().uint8).numpy().tobytes()
        return msgspec.msgpack.Ext(TENSOR_EXT, len(header).to_bytes(2, "little") + header + data)
    raise NotImplementedError(f"cannot send {type(obj).__name__} to the engine")


def _decode_extra(code: int, data: memoryview) -> Any:
    if code != TENSOR_EXT:
        raise NotImplementedError(f"unknown msgpack extension {code}")
    torch = torch_module()
    size = int.from_bytes(data[:2], "little")
    dtype, _, shape = bytes(data[2 : 2 + size]).decode().partition(":")
    raw = torch.frombuffer(bytearray(data[2 + size :]), dtype=torch.uint8)  # a copy: the frame is reused
    return raw.view(getattr(torch, dtype)).reshape([int(n) for n in shape.split(",") if n])


def torch_module() -> Any:
    import torch  # only where tensors cross (images): the codec itself stays light

    return torch


class Codec:
    """One encoder and decoder per side and direction (each reuses its buffers; not thread safe)."""

    def __init__(self, decodes: type) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_encode_extra)
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(decodes, ext_hook=_decode_extra)

    def encode(self, message: Command | Event) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes | memoryview) -> Any:
        return self._decoder.decode(data)


def command_codec() -> Codec:
    return Codec(Command)  # type: ignore[arg-type]


def event_codec() -> Codec:
    return Codec(Event)  # type: ignore[arg-type]
