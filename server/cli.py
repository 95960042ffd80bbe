"""`sloth-serve`: flags -> Config -> the FastAPI app under uvicorn. The flags are generated from
Config's fields (server/config.py says how to add one). With no --model it serves the embedded demo model."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .config import Config
from .flags import GROUPS, flag_names, flag_of, word_reader
from .loader.chat_template import check_folder_template
from .version import __version__

EXAMPLES = """examples:
  sloth-serve                                     # the embedded demo model on 127.0.0.1:8000
  sloth-serve --model ./Llama-3.2-1B-Instruct --lora sql=./adapters/sql --api-key "$KEY"
  sloth-serve --model ./model --lora-dir ./adapters --host 0.0.0.0 --log-format json
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sql", "messages": [{"role": "user", "content": "Hi"}]}'
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, unless the help already says it or there is none
    worth showing (unset, off, empty); the examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or (isinstance(default, list | tuple) and not default)):
            return text
        if isinstance(default, tuple):  # as it is written on the command line: comma-separated
            return f"{text} (default: {','.join(map(str, default)).replace('%', '%%')})"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one JSON record when --log-format json is asked for."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            from .startup import startup_error_line

            print(startup_error_line(message, "json"), file=sys.stderr, flush=True)
            sys.exit(2)
        super().error(message)


class Repeat(argparse.Action):
    """A repeatable flag: each use adds a value to a tuple; given values replace the default."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        held = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (*(() if held is self.default else held), values))


def add_flag(group: argparse._ArgumentGroup, field: dataclasses.Field[Any], hint: Any) -> None:
    flag = flag_of(field)
    common: dict[str, Any] = {"dest": field.name, "default": field.default, "help": flag.help}
    if isinstance(field.default, bool):
        group.add_argument(*flag_names(field), action="store_const", const=not field.default, **common)
        return
    group.add_argument(*flag_names(field), type=word_reader(field, hint), choices=flag.choices,
                       metavar=flag.metavar, action=Repeat if flag.repeat else "store", **common)


def build_parser() -> Parser:
    """Every Config field's flag (server/flags.py), in --help's sections, plus --version."""
    p = Parser(prog="sloth-serve", description="OpenAI-compatible server for Unsloth fine-tuned models.",
               formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"sloth-serve {__version__}", help="print the version and exit")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        add_flag(groups[flag_of(field).group], field, hints[field.name])
    return p


def from_env(field: dataclasses.Field[Any], text: str) -> Any:
    flag = flag_of(field)
    read = word_reader(field, typing.get_type_hints(Config)[field.name])
    try:
        if not flag.repeat:
            return read(text)
        words = tuple(read(w.strip()) for w in text.split(",") if w.strip())
        if not words:  # set to blanks or commas: not "none", which an unset variable says
            raise ValueError("it is set but holds no value")
        return words
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"${flag.env}: {exc}") from exc


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config of parsed flags: environment fallbacks, each field's resolve step, Config's checks,
    then the chat templates of the model and adapter folders compiled (one line now, not a 500 later)."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Config):
        flag = flag_of(field)
        value = getattr(args, field.name, field.default)
        if flag.env and value == field.default and os.environ.get(flag.env):
            value = from_env(field, os.environ[flag.env])
        if flag.resolve is not None and value != field.default:
            value = flag.resolve(value)
        values[field.name] = value
    config = Config(**values)
    check_folder_template(Path(config.model).expanduser(), "--model")
    for name, path in config.lora_modules:
        check_folder_template(Path(path).expanduser(), f"--lora {name}")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    parser.json_errors = "--log-format=json" in words or any(
        pair == ("--log-format", "json") for pair in itertools.pairwise(words))
    args = parser.parse_args(words)
    from .startup import report_startup_error, serve  # light: torch comes after the checks

    try:
        config = config_from_args(args)
    except ValueError as exc:
        return report_startup_error(exc, args.log_level, args.log_format)
    try:
        return serve(config)
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signals (importing torch)
        return 130


if __name__ == "__main__":
    sys.exit(main())
