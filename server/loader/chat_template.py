"""Chat templates as files hold them: the one a model or adapter folder carries, the --chat-template
flag (a file or inline Jinja), and a compile check that fails with one line naming the source, at
start-up or when an adapter loads, instead of at the first request. Needs only jinja2 (no
transformers), so the CLI can check before anything heavy is imported."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# One template, or named ones ({"default": ..., "tool_use": ...}) as transformers keeps several.
Template = str | dict[str, str]

JINJA_FILE = "chat_template.jinja"  # transformers >= 4.52 writes the template here
EXTRA_TEMPLATES_DIR = "additional_chat_templates"  # transformers 5: named templates, one file each


class ChatTemplateError(ValueError):
    """A template that cannot be read or compiled; the message names where it came from."""


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant text for training
    masks): read as a plain block here, so templates that use it pass the check."""

    tags = {"generation"}  # noqa: RUF012 (jinja declares it so)

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def check_template(template: Template, where: str) -> None:
    """Compile every template as transformers would (sandboxed, trim_blocks, lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    named = template.items() if isinstance(template, dict) else [("", template)]
    for name, text in named:
        label = f" {name!r}" if name else ""
        if not isinstance(text, str):
            raise ChatTemplateError(f"{where}: the chat template{label} is a {type(text).__name__}, not Jinja text")
        try:
            env.from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"{where}: the chat template{label} is not valid Jinja: {exc.message} (template line "
                f"{exc.lineno}); fix the template or remove it to fall back to the base model's"
            ) from None


def template_hash(template: Template) -> str:
    """A short fingerprint (sha256 of the text, 12 hex digits) to tell templates apart."""
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _normalize(value: Any, source: Path) -> Template:
    """tokenizer_config.json holds a string, or (older transformers) a list of {name, template}."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ChatTemplateError(f"{source}: chat_template must be a string or a list of {{name, template}} objects")


def read_folder_template(folder: Path) -> Template | None:
    """The folder's own template, read as transformers reads it: chat_template.jinja (with the named
    ones in additional_chat_templates/) before `chat_template` in tokenizer_config.json; None if
    neither is there."""
    jinja = folder / JINJA_FILE
    if jinja.is_file():
        default = jinja.read_text(encoding="utf-8")
        extra_dir = folder / EXTRA_TEMPLATES_DIR
        extra = {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra_dir.glob("*.jinja"))} if extra_dir.is_dir() else {}
        return {"default": default, **extra} if extra else default
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = read_json(config).get("chat_template")
    return None if value is None else _normalize(value, config)


def read_processor_template(folder: Path) -> Template | None:
    """The template an image-text model's processor saved in chat_template.json (transformers'
    processors read it; its tokenizer alone does not), or None."""
    path = folder / "chat_template.json"
    if not path.is_file():
        return None
    value = read_json(path).get("chat_template")
    return None if value is None else _normalize(value, path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object")
    return data


def check_folder_template(folder: Path, where: str) -> None:
    """One-line error for a folder whose own template cannot be read or compiled."""
    template = read_folder_template(folder)
    if template is not None:
        check_template(template, f"{where} ({folder})")


def resolve_template_flag(value: str) -> str:
    """--chat-template: a file's contents, or the value itself when it is inline Jinja; compiled."""
    try:
        path = Path(value).expanduser()
        is_file = path.is_file()
    except (OSError, ValueError):  # an inline template is not a valid path (too long, NUL byte)
        is_file = False
    if is_file:
        text = path.read_text(encoding="utf-8")
        check_template(text, f"--chat-template {path}")
        return text
    if "{{" not in value and "{%" not in value:
        raise ChatTemplateError(
            f"--chat-template {value!r}: no such file, and not inline Jinja (an inline template holds "
            "'{{' or '{%'); give a template file's path or the template itself"
        )
    check_template(value, "--chat-template")
    return value
