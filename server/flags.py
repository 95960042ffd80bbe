"""How a Config field appears on the command line: its Flag (names, help, choices, how a word is
read), declared beside the field with setting(). server/cli.py builds the parser from these alone."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# The sections of --help, in this order; every Flag names one of them.
GROUPS = ("model", "engine", "LoRA", "HTTP server", "logging")


@dataclass(frozen=True, slots=True)
class Flag:
    help: str
    group: str
    # Option strings; the first is the flag's name (messages use it), the rest are aliases. Default:
    # --field-name, or --no-field-name for a bool field whose default is True.
    names: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None  # also checked by Config for values set in code
    metavar: str | None = None
    # Reads one command-line word. Default: the field's type (int, float, str); a bool field's flag
    # takes no word and sets the opposite of the default.
    parse: Callable[[str], Any] | None = None
    repeat: bool = False  # the flag may be given several times; the field holds a tuple of the values
    env: str | None = None  # environment variable read (comma-separated if repeat) when the flag is not given
    # Run by cli.config_from_args on a value other than the default, before Config is built: work that
    # may read files or compile; a ValueError is a start-up error whose message names the flag.
    resolve: Callable[[Any], Any] | None = None


def setting(default: T, help: str, group: str, *, names: tuple[str, ...] = (),
            choices: tuple[Any, ...] | None = None, metavar: str | None = None,
            parse: Callable[[str], Any] | None = None, repeat: bool = False, env: str | None = None,
            resolve: Callable[[Any], Any] | None = None) -> T:
    """A Config field with a default and its command-line flag."""
    flag = Flag(help, group, names, choices, metavar, parse, repeat, env, resolve)
    if group not in GROUPS:
        raise ValueError(f"flag group {group!r} is not one of {GROUPS}")
    return dataclasses.field(default=default, metadata={"flag": flag})  # type: ignore[no-any-return]


def flag_of(field: dataclasses.Field[Any]) -> Flag:
    flag = field.metadata.get("flag")
    if not isinstance(flag, Flag):
        raise TypeError(f"Config.{field.name} has no flag: declare it with sloth_serve.flags.setting(...)")
    return flag


def flag_names(field: dataclasses.Field[Any]) -> tuple[str, ...]:
    names = flag_of(field).names
    if names:
        return names
    dashed = field.name.replace("_", "-")
    return (f"--no-{dashed}",) if field.default is True else (f"--{dashed}",)


def flag_name(config_cls: type, name: str) -> str:
    """The flag of one Config field, for messages: `flag_name(Config, "max_loras")` is --max-loras."""
    return flag_names(next(f for f in dataclasses.fields(config_cls) if f.name == name))[0]


def word_reader(field: dataclasses.Field[Any], hint: Any) -> Callable[[str], Any]:
    """How one word of a field's flag is read: its Flag.parse, else by the field's type (for a repeat
    flag, the tuple's element type): int or float (also `| None`), else the word itself."""
    flag = flag_of(field)
    if flag.parse is not None:
        return flag.parse
    if flag.repeat:
        hint = (typing.get_args(hint) or (str,))[0]
    elif typing.get_origin(hint) is tuple:
        raise TypeError(f"Config.{field.name} is a tuple: give its setting() repeat=True or a parse "
                        "(flags.word_list, flags.int_list)")
    for kind in (int, float):
        if hint is kind or hint == kind | None:
            return kind
    return str


# Readers of one word, for Flag.parse. Their __name__ appears in argparse's "invalid ... value" errors.

def lora_pair(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora takes NAME=PATH, got {value!r}")
    return name, path


def int_list(value: str) -> tuple[int, ...]:
    return tuple(int(x) for x in value.split(","))


def word_list(value: str) -> tuple[str, ...]:
    return tuple(word for word in value.split(",") if word)  # '' is the empty list


def seconds(value: str) -> float | None:
    """Seconds, 0 meaning no limit (None)."""
    number = float(value)
    return None if number == 0 else number


def is_seconds(value: float) -> bool:
    return 0 < value < math.inf
