"""The CLI is generated from Config's fields: every field has a flag that --help lists, parsing
nothing gives Config(), and a new setting needs only a field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from sloth_serve import cli
from sloth_serve.cli import build_parser, config_from_args
from sloth_serve.config import Config
from sloth_serve.flags import flag_names, setting


def test_every_config_field_has_a_flag_that_help_lists() -> None:
    parser = build_parser()
    text = parser.format_help()
    by_dest = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(Config):
        assert field.name in by_dest, f"Config.{field.name} has no flag"
        for name in flag_names(field):
            assert name in by_dest[field.name].option_strings
            assert f"{name} " in text or f"{name}\n" in text or f"{name}," in text, f"--help misses {name}"
        assert (by_dest[field.name].help or "").strip(), f"{flag_names(field)[0]} has no help"


def test_no_flags_give_the_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLOTH_API_KEY", raising=False)
    assert config_from_args(build_parser().parse_args([])) == Config()


def test_flag_kinds_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLOTH_API_KEY", raising=False)
    parse = build_parser().parse_args
    config = config_from_args(parse([
        "--lora", "a=/x", "--lora", "b=/y", "--allowed-origins", "*", "--no-prefix-caching", "--enforce-eager",
        "--disable-access-log", "--disable-access-log-for-endpoints", "", "--cuda-graph-sizes", "1,2,8",
        "--block-size", "32", "--max-lora-rank", "8", "--gpu-memory-utilization", "0.5", "--request-timeout", "0",
    ]))
    assert config.lora_modules == (("a", "/x"), ("b", "/y")) and config.allowed_origins == ("*",)
    assert not config.enable_prefix_caching and config.enforce_eager and not config.access_log
    assert config.access_log_skip_paths == () and config.cuda_graph_sizes == (1, 2, 8)
    assert (config.block_size, config.max_lora_rank, config.gpu_memory_utilization) == (32, 8, 0.5)
    assert config.request_timeout is None  # 0: no limit
    # The alias sets the same field; a repeated flag's values replace a non-empty default.
    assert not config_from_args(parse(["--disable-uvicorn-access-log"])).access_log
    assert config_from_args(parse(["--disable-access-log-for-endpoints", "/a,/b"])).access_log_skip_paths == ("/a", "/b")


def test_environment_fallback_only_without_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOTH_API_KEY", "k1,k2")
    parse = build_parser().parse_args
    assert config_from_args(parse([])).api_key == ("k1", "k2")
    monkeypatch.setenv("SLOTH_API_KEY", " , ")  # set, but no key: refused, not "no keys" (auth off)
    with pytest.raises(ValueError, match="SLOTH_API_KEY: it is set but holds no value"):
        config_from_args(parse([]))
    assert config_from_args(parse(["--api-key", "z"])).api_key == ("z",)
    monkeypatch.setenv("SLOTH_API_KEY", " k1, k2\n")  # as a shell or a secret file writes it
    assert config_from_args(parse([])).api_key == ("k1", "k2")


@pytest.mark.parametrize(("settings", "message"), [
    ({"dtype": "int8"}, "--dtype must be one of auto, float32, bfloat16, float16; got 'int8'"),
    ({"block_size": 7}, "--block-size must be one of 8, 16, 32, 64, 128"),
    ({"log_level": "loud"}, "--log-level must be one of"),
    ({"max_loras": 0}, "--max-loras must be at least 1; got 0"),
    ({"max_queued_requests": 0}, "--max-queued-requests must be at least 1"),
    ({"port": 70000}, "--port must be in [0, 65535]"),
    ({"keep_alive_timeout": 0.0}, "--keep-alive-timeout must be a positive number of seconds"),
    ({"api_server_count": 0}, "--api-server-count must be at least 1; got 0"),
    ({"api_server_count": 2, "engine_mode": "thread"}, "--api-server-count above 1 needs the engine in its own process"),
    ({"seed": 2**64}, "--seed must be in"),
    ({"api_key": ("",)}, "a key is empty or has spaces around it"),
    ({"api_key": ("k ",)}, "a key is empty or has spaces around it"),
])
def test_checks_run_for_config_built_in_code(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Config(**settings)  # type: ignore[arg-type]


def test_several_front_ends_serve_a_lora_dir() -> None:
    assert Config(api_server_count=2, lora_dirs=("adapters",)).lora_dirs == ("adapters",)


def test_argparse_rejects_bad_words_with_the_flag_named(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--lora", "no-equals"], ["--cuda-graph-sizes", "1,x"], ["--sampler", "fast"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_a_new_setting_needs_only_a_field(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass(frozen=True, slots=True)
    class Extended(Config):
        max_widgets: int = setting(4, "widgets per step at most", "engine")
        widget_sizes: tuple[int, ...] = setting((), "a widget size (repeatable)", "engine", names=("--widget",),
                                                repeat=True)
        widget_kind: str | None = setting(None, "the widgets' kind", "engine", choices=("round", "square"))

    monkeypatch.setattr(cli, "Config", Extended)
    parser = build_parser()
    assert "--max-widgets MAX_WIDGETS" in parser.format_help() and "(default: 4)" in parser.format_help()
    config = config_from_args(parser.parse_args(["--max-widgets", "7", "--widget", "3", "--widget", "5"]))
    assert isinstance(config, Extended) and config.max_widgets == 7 and config.widget_sizes == (3, 5)
    assert config.widget_kind is None  # unset passes its choices
    assert config_from_args(parser.parse_args(["--widget-kind", "round"])).widget_kind == "round"
    with pytest.raises(ValueError, match="--widget-kind must be one of round, square; got 'oval'"):
        Extended(widget_kind="oval")


def test_a_tuple_setting_without_a_way_to_read_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass(frozen=True, slots=True)
    class Unreadable(Config):
        sizes: tuple[int, ...] = setting((), "sizes", "engine")

    monkeypatch.setattr(cli, "Config", Unreadable)
    with pytest.raises(TypeError, match=r"Config\.sizes is a tuple"):
        build_parser()
