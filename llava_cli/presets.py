"""Presets: named YAML files of settings, and the one rule that layers them with defaults, environment and flags.

Precedence, lowest first: the command's built-in defaults < presets (in the order given) < environment variables
(LLAVA_MODEL, LLAVA_DTYPE, LLAVA_DEVICE) < command-line flags. Built-in presets ship inside the package
(llava_cli/presets/*.yaml); a user's preset of the same name in $XDG_CONFIG_HOME/llava/presets (default
~/.config/llava/presets) replaces the built-in one. `--preset` also takes a path to a YAML file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import LlavaError
from .templates import TEMPLATES

ENV = {"model": "LLAVA_MODEL", "dtype": "LLAVA_DTYPE", "device": "LLAVA_DEVICE"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
SUFFIXES = (".yaml", ".yml")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# key -> (test of the value, what is allowed); a null value is always allowed and means "not set".
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "description": (lambda x: isinstance(x, str), "text"),
    "model": (lambda x: isinstance(x, str) and x != "", "a hub model id or a checkpoint folder"),
    "template": (lambda x: x in TEMPLATES, "one of " + ", ".join(TEMPLATES)),
    "dtype": (lambda x: x in DTYPES, "one of " + ", ".join(DTYPES)),
    "device": (lambda x: isinstance(x, str) and x != "", "auto, cpu, cuda, cuda:N or mps"),
    "context_length": (lambda x: _integer(x) and x >= 1, "an integer >= 1"),
    "system": (lambda x: isinstance(x, str), "text"),
    "prompt": (lambda x: isinstance(x, str) and x.strip() != "", "non-empty text"),
    "max_tokens": (lambda x: _integer(x) and x >= 1, "an integer >= 1"),
    "temperature": (lambda x: _number(x) and x >= 0, "a number >= 0"),
    "top_p": (lambda x: _number(x) and 0 < x <= 1, "a number in (0, 1]"),
    "top_k": (lambda x: _integer(x) and x >= 0, "an integer >= 0"),
    "seed": (_integer, "an integer"),
    "pad_square": (lambda x: isinstance(x, bool), "true or false"),
}


@dataclass(frozen=True)
class Preset:
    """One preset file, read and checked."""

    name: str
    path: Path
    builtin: bool
    values: dict[str, Any]  # only the keys the file sets to a non-null value

    @property
    def kind(self) -> str:
        """'model' for a checkpoint preset, 'task' for a prompt and settings."""
        return "model" if "model" in self.values else "task"

    @property
    def description(self) -> str:
        return self.values.get("description", "")


def user_dir() -> Path:
    """$XDG_CONFIG_HOME/llava/presets, or ~/.config/llava/presets (XDG: a relative XDG_CONFIG_HOME is ignored)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "llava" / "presets"


def builtin_dir() -> Path:
    return Path(str(resources.files("llava_cli") / "presets"))


def read(path: Path, name: str | None = None, builtin: bool = False) -> Preset:
    """Read and check one preset file; every problem is one line naming the file and the key."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlavaError(f"preset file '{path}' not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LlavaError(f"{path}: invalid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LlavaError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LlavaError(f"{path}: a preset is a mapping of settings (key: value), got {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in FIELDS:
            raise LlavaError(f"{path}: unknown key {key!r} (allowed: {', '.join(FIELDS)})")
        test, allowed = FIELDS[key]
        if value is None:
            continue
        if key in ("temperature", "top_p") and _integer(value):
            value = float(value)
        if not test(value):
            raise LlavaError(f"{path}: {key!r} must be {allowed}, got {value!r}")
        values[key] = value
    model = values.get("model")
    if model and not builtin and model.startswith(("./", "../")):
        values["model"] = str((path.parent / model).resolve())  # relative to the preset file, not the shell
    return Preset(name or path.stem, path, builtin, values)


def _files(folder: Path) -> dict[str, Path]:
    try:
        return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in SUFFIXES and p.is_file()}
    except OSError:  # no such folder, or unreadable: no presets there
        return {}


def available() -> dict[str, Preset]:
    """Every preset by name, a user's replacing the built-in one of the same name; sorted by kind then name."""
    found = {name: (path, True) for name, path in _files(builtin_dir()).items()}
    found |= {name: (path, False) for name, path in _files(user_dir()).items()}
    presets = [read(path, name, builtin) for name, (path, builtin) in found.items()]
    return {p.name: p for p in sorted(presets, key=lambda p: (p.kind, p.name))}


def names() -> list[str]:
    """Preset names without reading the files (for shell completion)."""
    return sorted(_files(builtin_dir()) | _files(user_dir()))


def load(spec: str) -> Preset:
    """A preset by name (user folder, then built-in) or by the path of a YAML file."""
    path = Path(spec).expanduser()
    if path.suffix in SUFFIXES or os.sep in spec or "/" in spec:
        if path.is_file():
            return read(path)
        raise LlavaError(f"preset file '{spec}' not found")
    for folder, builtin in ((user_dir(), False), (builtin_dir(), True)):
        for suffix in SUFFIXES:
            if (folder / (spec + suffix)).is_file():
                return read(folder / (spec + suffix), spec, builtin)
    raise LlavaError(f"unknown preset {spec!r} (known: {', '.join(names()) or 'none'}; or give a .yaml file)")


def layer(defaults: Mapping[str, Any], presets: Iterable[Preset], env: Mapping[str, str],
          explicit: Mapping[str, Any]) -> dict[str, Any]:
    """The settings in force: defaults < presets in order < environment (ENV) < explicit (flag) values.

    Keys of presets that are not in `defaults` (prompt, context_length, ...) are kept too; `defaults` should hold
    every parameter the command has, so that a preset key the command lacks is still visible to it.
    """
    merged = dict(defaults)
    for preset in presets:
        merged.update(preset.values)
    merged.pop("description", None)
    for key, var in ENV.items():
        if key in defaults and env.get(var):
            merged[key] = env[var]
    merged.update(explicit)
    return merged


def resolve(ctx: Any, specs: Iterable[str] | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """For a command: its parameter values layered over the given presets, as `layer` orders them.

    `ctx` is the command's typer.Context: a parameter whose value came from the command line (or from an envvar
    the option declares itself, such as LLAVA_MODEL) is explicit; one left at its default is not.
    """
    presets = [load(s) for s in specs or ()]
    explicit = {k: v for k, v in params.items() if _source(ctx, k) not in ("DEFAULT", "DEFAULT_MAP", None)}
    env = {k: v for k, v in os.environ.items() if k in ENV.values()}
    for key, var in ENV.items():  # an envvar the option itself reads (LLAVA_MODEL) has already made it explicit
        if key in explicit and _source(ctx, key) == "ENVIRONMENT":
            env.pop(var, None)
    settings = layer(params, presets, env, explicit)
    model_preset = next((p for p in reversed(presets) if "model" in p.values), None)
    if model_preset and settings.get("model") != model_preset.values["model"] and _source(ctx, "model") != "COMMANDLINE":
        from .ui import warn

        warn(f"LLAVA_MODEL={settings['model']} overrides the model of preset {model_preset.name!r}")
    return settings


def _source(ctx: Any, name: str) -> str | None:
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source.name if source is not None else None


def dump(preset: Preset) -> str:
    """The preset's settings as YAML, in the order FIELDS lists them."""
    ordered = {k: preset.values[k] for k in FIELDS if k in preset.values}
    return yaml.dump(ordered, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


class _Dumper(yaml.SafeDumper):
    """Multi-line text as a YAML block (`|`), as a person writes it."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


QUESTION = "{question}"


def question(prompt: str | None, given: str | None) -> str | None:
    """What to ask: the question given, else the preset's prompt; a prompt holding {question} wraps the one given."""
    if prompt is None:
        return given
    if QUESTION in prompt:
        return prompt.replace(QUESTION, given) if given is not None else None
    return given if given is not None else prompt
