"""The start-up checks (server/preflight.py), run in-process on small folders: each unservable
model, adapter, device or port is named with what to do instead, before torch is imported."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sloth_serve import preflight
from sloth_serve.cli import build_parser, config_from_args
from sloth_serve.config import Config
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL
from sloth_serve.preflight import StartupError, check_device, check_model, check_port, run_checks

REPO = Path(__file__).resolve().parents[2]


def model_folder(tmp_path: Path, name: str = "model", **config_changes: object) -> Path:
    """A model folder the checks accept (the demo's config, empty weight and tokenizer files),
    with config.json changed as given (None removes a key)."""
    folder = tmp_path / name
    folder.mkdir()
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def error_of(fn: object, *args: object) -> str:
    with pytest.raises(StartupError) as info:
        fn(*args)  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


def test_the_demo_model_and_an_adapter_folder_as_model_pass() -> None:
    assert check_model(str(DEMO_MODEL), "unsloth").endswith("LlamaForCausalLM, 16-bit")
    summary = check_model(str(DEMO_ADAPTER), "unsloth")
    assert "is a LoRA adapter on" in summary and str(DEMO_MODEL.resolve()) in summary


@pytest.mark.parametrize("name, content", [("model.gguf", b"GGUF\x03\x00"), ("weights.bin", b"GGUF\x03\x00"),
                                           ("model.GGUF", b"")])
def test_gguf_file_is_named_as_gguf_by_suffix_or_magic(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    message = error_of(check_model, str(path), "unsloth")
    assert "GGUF file" in message and "llama.cpp" in message


def test_folder_of_gguf_files_is_named(tmp_path: Path) -> None:
    (tmp_path / "q4_k_m.gguf").write_bytes(b"GGUF")
    assert "holds GGUF files" in error_of(check_model, str(tmp_path), "unsloth")


def test_onnx_file_and_onnx_export_are_named(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    assert "ONNX graph" in error_of(check_model, str(tmp_path / "model.onnx"), "unsloth")
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (export / "model.onnx").write_bytes(b"")
    assert "ONNX export" in error_of(check_model, str(export), "unsloth")


def test_one_file_of_a_model_points_at_its_folder(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    message = error_of(check_model, str(folder / "model.safetensors"), "unsloth")
    assert f"--model {folder}" in message


@pytest.mark.parametrize("method, name", [("gptq", "GPTQ"), ("awq", "AWQ"), ("exl2", "EXL2"), ("fp8", "FP8"),
                                          ("somethingnew", "somethingnew")])
def test_foreign_quantization_is_named_with_what_to_pass(tmp_path: Path, method: str, name: str) -> None:
    folder = model_folder(tmp_path, quantization_config={"quant_method": method, "bits": 4})
    message = error_of(check_model, str(folder), "unsloth")
    assert f"quantized with {name}" in message and "16-bit checkpoint" in message


def test_bitsandbytes_4bit_reads_as_stored_for_native_models_only(tmp_path: Path) -> None:
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    folder = model_folder(tmp_path, quantization_config=quant)
    assert check_model(str(folder), "unsloth").endswith("bitsandbytes 4-bit")
    assert check_model(str(folder), "safetensors").endswith("bitsandbytes 4-bit, read from the files as stored")
    generic = model_folder(tmp_path, "generic", quantization_config=quant, architectures=["GraniteForCausalLM"],
                           model_type="granite")
    assert "--load-format safetensors" in error_of(check_model, str(generic), "safetensors")


def test_bitsandbytes_8bit_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    assert "8-bit" in error_of(check_model, str(folder), "unsloth")


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, architectures=["GPT2LMHeadModel"])
    message = error_of(check_model, str(folder), "unsloth")
    assert "GPT2LMHeadModel" in message and "Qwen3ForCausalLM" in message and "LlamaForCausalLM" in message


@pytest.mark.parametrize("text, expected", [("{not json", "not valid JSON"), ("[]", "JSON list, not an object")])
def test_config_that_is_not_a_json_object(tmp_path: Path, text: str, expected: str) -> None:
    folder = model_folder(tmp_path)
    (folder / "config.json").write_text(text)
    assert expected in error_of(check_model, str(folder), "unsloth")


def test_config_missing_a_field_names_it(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, num_attention_heads=None)
    assert "lacks 'num_attention_heads'" in error_of(check_model, str(folder), "unsloth")


def test_folder_without_weights_or_tokenizer(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    (folder / "tokenizer.json").unlink()
    assert "no tokenizer" in error_of(check_model, str(folder), "unsloth")
    (folder / "model.safetensors").unlink()
    assert "no weights" in error_of(check_model, str(folder), "unsloth")


def test_missing_folder_and_hub_id(tmp_path: Path) -> None:
    assert "does not exist" in error_of(check_model, str(tmp_path / "nope"), "unsloth")
    message = error_of(check_model, "unsloth/Llama-3.2-1B-Instruct", "unsloth")
    assert "never downloads" in message and "--local-dir" in message


def test_empty_folder_is_neither_model_nor_adapter(tmp_path: Path) -> None:
    assert "neither config.json" in error_of(check_model, str(tmp_path), "unsloth")


def adapter_copy(tmp_path: Path, name: str = "adapter") -> Path:
    folder = tmp_path / name
    shutil.copytree(DEMO_ADAPTER, folder)
    return folder


@pytest.mark.parametrize("breakage, expected", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("no-config", "has no adapter_config.json"),
    ("list", "JSON list, not an object"),
    ("dora", "DoRA adapter"),
    ("no-weights", "no adapter_model.safetensors"),
])
def test_bad_lora_folder_fails_start_up(tmp_path: Path, breakage: str, expected: str) -> None:
    folder = adapter_copy(tmp_path)
    config_path = folder / "adapter_config.json"
    if breakage == "missing":
        shutil.rmtree(folder)
    elif breakage == "file":
        folder = folder / "adapter_model.safetensors"
    elif breakage == "no-config":
        config_path.unlink()
    elif breakage == "list":
        config_path.write_text("[]")
    elif breakage == "dora":
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    else:
        (folder / "adapter_model.safetensors").unlink()
    config = Config(lora_modules=(("sql", str(folder)),))
    message = error_of(run_checks, config, "base")
    assert message.startswith(f"--lora sql={folder}") and expected in message
    merge = Config(merge_lora=str(folder))
    assert expected in error_of(run_checks, merge, "base")


def test_lora_names_must_be_unique_and_not_the_base(tmp_path: Path) -> None:
    adapter = str(adapter_copy(tmp_path))
    assert "the base model" in error_of(run_checks, Config(lora_modules=(("base", adapter),)), "base")
    twice = Config(lora_modules=(("a", adapter), ("a", adapter)))
    assert "another --lora" in error_of(run_checks, twice, "base")


def test_lora_dir_must_be_a_folder(tmp_path: Path) -> None:
    config = Config(lora_dirs=(str(tmp_path / "nope"),))
    assert "--lora-dir" in error_of(run_checks, config, "base")


def test_device_names_and_gpu_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    check_device("cpu")
    check_device("auto")
    assert "is not one of" in error_of(check_device, "gpu")
    monkeypatch.setattr(preflight, "cuda_device_count", lambda: (0, "no NVIDIA driver (libcuda.so.1)"))
    message = error_of(check_device, "cuda")
    assert "no NVIDIA driver" in message and "--device cpu" in message
    monkeypatch.setattr(preflight, "cuda_device_count", lambda: (2, ""))
    assert "only 2 GPU(s)" in error_of(check_device, "cuda:2")
    monkeypatch.setattr(preflight, "torch_cuda_build", lambda: None)
    assert "CPU build" in error_of(check_device, "cuda:1")
    monkeypatch.setattr(preflight, "torch_cuda_build", lambda: "13.0")
    check_device("cuda:1")


def test_this_machine_driver_count_matches_its_visible_gpus() -> None:
    count, why = preflight.cuda_device_count()
    assert count >= 0 and (count > 0 or why)


def test_port_in_use_is_found_before_start() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        message = error_of(check_port, "127.0.0.1", port)
        assert f"127.0.0.1:{port}" in message and "--port" in message
    check_port("127.0.0.1", port)  # free again
    assert "cannot resolve" in error_of(check_port, "no-such-host.invalid", 8000)


def test_config_from_args_then_checks_pass_for_the_defaults() -> None:
    args = build_parser().parse_args(["--port", "0"])
    assert "LlamaForCausalLM" in run_checks(config_from_args(args), "base")


def test_checks_and_cli_import_neither_torch_nor_transformers() -> None:
    code = ("import sys, sloth_serve.cli, sloth_serve.preflight, sloth_serve.startup; "
            "heavy = [m for m in ('torch', 'transformers', 'unsloth', 'uvicorn') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_option_has_help_and_help_shows_defaults_and_examples() -> None:
    parser = build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert undocumented == []
    text = parser.format_help()
    assert "--max-num-seqs" in text and "(default: 64)" in text
    assert "examples:" in text and "sloth-serve --model" in text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert str(DEMO_MODEL) not in text  # the demo's path on this machine is not shown
