"""Start-up checks that run before torch is imported or a weight is read: the packages, the model
path and its config.json, the adapter folders, the device and the port. Each failure is one
StartupError whose message says what is wrong and what to do instead."""

from __future__ import annotations

import ctypes
import importlib.util
import re
import socket
from pathlib import Path

from .config import Config
from .loader.adapter_config import AdapterError
from .loader.adapter_layout import check_adapter_folder
from .loader.folders import is_adapter_folder, read_json_object, resolve_adapter_base
from .models.config import ModelConfig
from .models.families import UnsupportedModel, route_of, supported_summary

# The torch builds this release is tested with (versions.env holds them with the reasons; a test
# keeps these in step with it).
TORCH_CPU_VERSION = "2.13.0"
TORCH_CUDA_VERSION = "2.11.0"

# quantization_config.quant_method -> how its users spell it (bitsandbytes is the one we load).
FOREIGN_QUANT = {"gptq": "GPTQ", "awq": "AWQ", "exl2": "EXL2", "exl3": "EXL3", "aqlm": "AQLM", "hqq": "HQQ",
                 "eetq": "EETQ", "fp8": "FP8", "compressed-tensors": "compressed-tensors", "quanto": "Quanto",
                 "torchao": "torchao", "mxfp4": "MXFP4", "fbgemm_fp8": "FBGEMM FP8", "vptq": "VPTQ"}
WHAT_TO_PASS = ("pass the original 16-bit checkpoint (sloth-serve quantizes it to 4-bit at load) or its "
                "bitsandbytes 4-bit version (Unsloth's '-bnb-4bit' uploads)")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class StartupError(Exception):
    """A setting that would make start-up fail: the message is the whole report (no traceback)."""


def check_packages(config: Config) -> None:
    if importlib.util.find_spec("torch") is None:
        raise StartupError(
            "PyTorch is not installed, and `pip install sloth-serve` does not install it (pip would pick a "
            f"multi-GB CUDA build). CPU only: install PyTorch's CPU build of torch=={TORCH_CPU_VERSION} (the "
            f"install selector on the PyTorch website gives the command). NVIDIA GPU: pip install "
            f"torch=={TORCH_CUDA_VERSION} (the default Linux wheel, CUDA 13.0, as the Dockerfile does)")
    if config.load_format == "unsloth" and importlib.util.find_spec("unsloth") is None:
        raise StartupError("--load-format unsloth (the default) needs Unsloth: pip install 'sloth-serve[unsloth]' "
                           "then unsloth and unsloth_zoo with --no-deps (see the Makefile), or pass "
                           "--load-format safetensors to read 16-bit weights without it")


def check_model(model: str, load_format: str) -> str:
    """The model folder's summary line; StartupError when it cannot be served."""
    path = Path(model).expanduser()
    if not path.exists():
        if HUB_ID.fullmatch(model) and not model.startswith("."):
            raise StartupError(f"--model {model}: no such folder, and sloth-serve never downloads; fetch it first "
                               f"(hf download {model} --local-dir DIR) and pass --model DIR")
        raise StartupError(f"--model {model} does not exist: pass a Hugging Face model folder "
                           "(config.json + *.safetensors) or a PEFT LoRA adapter folder")
    if path.is_file():
        raise StartupError(describe_model_file(path))
    if is_adapter_folder(path):
        check_adapter(f"--model {path}", path)
        try:
            base = resolve_adapter_base(path)
        except (OSError, ValueError) as exc:
            raise StartupError(str(exc)) from exc
        return f"{path} is a LoRA adapter on {check_model_folder(base, load_format)}"
    return check_model_folder(path, load_format)


def describe_model_file(path: Path) -> str:
    """Why a file is not a model folder, naming the format and what serves it."""
    suffix = path.suffix.lower()
    with path.open("rb") as f:
        magic = f.read(4)
    if suffix == ".gguf" or magic == b"GGUF":
        return (f"--model {path} is a GGUF file (llama.cpp's format), which sloth-serve does not read: "
                "pass the Hugging Face folder it was converted from (config.json + *.safetensors), "
                "or serve the GGUF file with llama.cpp")
    if suffix == ".onnx":
        return (f"--model {path} is an ONNX graph, which sloth-serve does not run: pass the Hugging Face "
                "model folder (config.json + *.safetensors), or serve the ONNX model with ONNX Runtime")
    if path.name == "config.json" or suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return f"--model {path} is one file of a model: pass the folder that holds it, --model {path.parent}"
    return (f"--model {path} is a file; --model takes a Hugging Face model folder (config.json + *.safetensors) "
            "or a PEFT LoRA adapter folder")


def check_model_folder(folder: Path, load_format: str) -> str:
    names = [p.name for p in folder.iterdir()]
    has_weights = any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin"))
                      for n in names)
    onnx = any(n.endswith(".onnx") for n in names) or (folder / "onnx").is_dir()
    if any(n.lower().endswith(".gguf") for n in names) and not has_weights:
        raise StartupError(f"--model {folder} holds GGUF files (llama.cpp's format), which sloth-serve does not "
                           "read: pass the Hugging Face folder they were converted from, or serve them with llama.cpp")
    if onnx and not has_weights:
        raise StartupError(f"--model {folder} is an ONNX export, which sloth-serve does not run: pass the "
                           "Hugging Face model it was exported from, or serve it with ONNX Runtime")
    if "config.json" not in names:
        raise StartupError(f"--model {folder} holds neither config.json (a model) nor adapter_config.json "
                           "(an adapter): pass a Hugging Face model folder or a PEFT LoRA adapter folder")
    try:
        cfg = read_json_object(folder / "config.json")
    except (OSError, ValueError) as exc:
        raise StartupError(f"--model: {exc}") from exc
    quant = cfg.get("quantization_config")
    kind = "16-bit"
    if isinstance(quant, dict):
        kind = check_quantization(folder, quant, load_format, str(cfg.get("model_type") or ""), _is_native(cfg))
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    arch = archs[0] if isinstance(archs, list) else archs
    try:
        route = route_of(cfg)
    except UnsupportedModel as exc:
        raise StartupError(f"--model {folder} is a {arch} model, which sloth-serve cannot run: {exc} "
                           f"({supported_summary()})") from exc
    try:
        if route.path == "native":  # the generic path reads its config through transformers
            ModelConfig.from_dict(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        missing = f"lacks {exc}" if isinstance(exc, KeyError) else f"is malformed ({exc})"
        raise StartupError(f"--model {folder}/config.json {missing}: is it a complete Hugging Face config?") from exc
    if not has_weights:
        raise StartupError(f"--model {folder} has config.json but no weights (*.safetensors)")
    if load_format == "safetensors" and not any(n.endswith(".safetensors") for n in names):
        raise StartupError(f"--model {folder} has no *.safetensors weights, which --load-format safetensors reads; "
                           "use --load-format unsloth (it reads pytorch_model*.bin too)")
    if not any(n in names for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise StartupError(f"--model {folder} has no tokenizer (tokenizer.json or tokenizer_config.json): "
                           "copy the tokenizer files of the model it was trained from into it")
    return f"{folder}: {arch}{' (generic path)' if route.path == 'generic' else ''}, {kind}"


def _is_native(cfg: dict) -> bool:
    try:
        return route_of(cfg).path == "native"
    except UnsupportedModel:
        return False  # reported once the quantization is checked


def check_quantization(folder: Path, quant: dict, load_format: str, model_type: str = "", native: bool = False) -> str:
    method = str(quant.get("quant_method", "")).lower()
    if method == "mxfp4" and model_type == "gpt_oss":  # OpenAI's originals (server/models/mxfp4.py)
        return "MXFP4 experts, dequantized to 16-bit at load (Unsloth is not used)"
    if not method and not any(quant.get(k) for k in ("load_in_4bit", "_load_in_4bit", "load_in_8bit")):
        return "16-bit"  # an empty or leftover quantization_config quantizes nothing
    if method in ("bitsandbytes", "") and (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        if load_format == "safetensors" and native:  # read as stored (server/loader/nf4_disk.py)
            return "bitsandbytes 4-bit, read from the files as stored"
        if load_format == "safetensors":
            raise StartupError(f"--model {folder} is a bitsandbytes 4-bit checkpoint of a model served through the "
                               "generic path; --load-format safetensors reads its 16-bit weights only: drop it (the "
                               "default, unsloth, loads 4-bit ones)")
        return "bitsandbytes 4-bit"
    if method == "bitsandbytes":
        raise StartupError(f"--model {folder} is a bitsandbytes 8-bit checkpoint; sloth-serve serves 4-bit: "
                           f"{WHAT_TO_PASS}")
    name = FOREIGN_QUANT.get(method, method or "an unknown")
    raise StartupError(f"--model {folder} is quantized with {name}, which sloth-serve cannot read: {WHAT_TO_PASS}; "
                       f"or serve it with an engine that reads {name} checkpoints")


def check_adapter(where: str, path: Path) -> None:
    """A PEFT LoRA folder whose adapter_config.json is a JSON object of a plain LoRA; `where` names
    the flag and value it came from."""
    if not path.exists():
        raise StartupError(f"{where} does not exist: pass a PEFT LoRA adapter folder (adapter_config.json + "
                           "adapter_model.safetensors)")
    if not path.is_dir():
        raise StartupError(f"{where} is a file: pass the adapter folder that holds it, {path.parent}")
    if not (path / "adapter_config.json").is_file():
        raise StartupError(f"{where} has no adapter_config.json: is it a PEFT LoRA adapter folder?")
    try:  # its config's fields, and its tensors' names, dtypes and ranks from the file's header
        check_adapter_folder(path)
    except (OSError, AdapterError) as exc:
        raise StartupError(f"{where}: {exc}") from exc


def check_lora_flags(config: Config, base_name: str) -> None:
    names: set[str] = set()
    for name, folder in config.lora_modules:
        if name == base_name or name in names:
            raise StartupError(f"--lora {name}=...: the name {name!r} is already taken "
                               f"({'the base model' if name == base_name else 'another --lora'}); give it another")
        names.add(name)
        check_adapter(f"--lora {name}={folder}", Path(folder).expanduser())
    if config.merge_lora:
        check_adapter(f"--merge-lora {config.merge_lora}", Path(config.merge_lora).expanduser())
    for root in config.lora_dirs:
        if not Path(root).expanduser().is_dir():
            raise StartupError(f"--lora-dir {root} is not a folder: pass a folder that holds adapter folders")


def cuda_device_count() -> tuple[int, str]:
    """GPUs the NVIDIA driver shows this process (CUDA_VISIBLE_DEVICES applies), and why none if none.
    Asks the driver (libcuda) directly: far cheaper than importing torch to ask it."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1) is installed or mounted"
    if (err := driver.cuInit(0)) != 0:
        return 0, "the NVIDIA driver sees no GPU" if err == 100 else f"the NVIDIA driver failed to start (error {err})"
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the NVIDIA driver sees no GPU"
    return count.value, ""


def torch_cuda_build() -> str | None:
    """The CUDA version the installed torch was built for (None: a CPU build), read from its
    version.py without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    match = re.search(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise StartupError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    count, why = cuda_device_count()
    if count == 0:
        raise StartupError(f"--device {device}: {why}; pass --device cpu (or auto), or run where a GPU is visible "
                           "(docker: --gpus all)")
    index = int(match.group(1) or 0)
    if index >= count:
        visible = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise StartupError(f"--device {device}: only {count} GPU(s) visible ({visible}; CUDA_VISIBLE_DEVICES "
                           "chooses which)")
    if torch_cuda_build() is None:
        raise StartupError(f"--device {device}: the installed torch is a CPU build; install a CUDA build "
                           f"(pip install torch=={TORCH_CUDA_VERSION}, as the Dockerfile does)")


def check_port(host: str, port: int) -> None:
    """Bind (host, port) once, as uvicorn will, so a taken port fails now and not after the load."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise StartupError(f"--host {host}: cannot resolve it ({exc.strerror})") from exc
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror}): stop what holds it, "
                               "or pick another --port / --host") from exc


def run_checks(config: Config, base_name: str) -> str:
    """Every check; returns the model's summary line for the log."""
    check_packages(config)
    summary = check_model(config.model, config.load_format)
    check_lora_flags(config, base_name)
    check_device(config.device)
    check_port(config.host, config.port)
    return summary
