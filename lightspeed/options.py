"""Command-line options generated from the config dataclasses, and where each value comes from.

Every leaf field made by `config.opt()` becomes one `FlagSpec`; nested config classes (planes,
router, frontend/worker inside serve) are flattened, and a flag that appears in two nested
configs (the plane flags under serve) sets both. A value comes from, first match wins: the flag
on the command line, the `LIGHTSPEED_<FLAG>` environment variable, the `--config` YAML file, the
field's default. Values are converted here; validation stays in each config's `__post_init__`.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

import msgspec
import yaml

from lightspeed.config import choices_of, type_hints

_T = TypeVar("_T")
FieldPath = tuple[str, ...]
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(raw: str) -> bool:
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ValueError(f"expected a boolean ({'/'.join(_TRUE)} or {'/'.join(_FALSE)}); got {raw!r}")


@dataclass(frozen=True)
class FlagSpec:
    """One flag: its name, the config fields it sets, their type, default and help."""

    flag: str  # "--kv-overlap-score-weight"
    paths: tuple[FieldPath, ...]  # e.g. (("frontend", "router", "overlap_score_weight"),)
    hint: Any  # int, float, str, bool or a Literal[...]
    default: Any
    help: str

    @property
    def key(self) -> str:
        """The name without dashes: the YAML key (underscores also accepted)."""
        return self.flag[2:]

    @property
    def dest(self) -> str:
        return self.key.replace("-", "_")

    @property
    def env(self) -> str:
        return "LIGHTSPEED_" + self.dest.upper()

    @property
    def choices(self) -> tuple[str, ...] | None:
        return choices_of(self.hint)

    def parse(self, raw: str) -> Any:
        """Convert a command-line or environment string; ValueError when it does not fit."""
        if self.hint is bool:
            return parse_bool(raw)
        if self.hint in (int, float):
            return self.hint(raw)
        for choice in self.choices or ():  # choices match case-insensitively: --log-level debug
            if raw.lower() == choice.lower():
                return choice
        return raw

    def from_file(self, value: Any) -> Any:
        """Convert a YAML value: strings like the environment, others checked against the type."""
        if isinstance(value, str):
            return self.parse(value)
        return msgspec.convert(value, self.hint)


def flag_specs(cls: type, hide: Iterable[str] = ()) -> tuple[FlagSpec, ...]:
    """The flags of a config class; `hide` names dotted field paths that get no flag."""
    hidden = {tuple(h.split(".")) for h in hide}
    merged: dict[str, FlagSpec] = {}
    for spec in _leaf_specs(cls, (), hidden):
        seen = merged.get(spec.flag)
        if seen is None:
            merged[spec.flag] = spec
        elif (seen.hint, seen.default) == (spec.hint, spec.default):
            merged[spec.flag] = FlagSpec(spec.flag, seen.paths + spec.paths, spec.hint, spec.default, seen.help)
        else:
            raise TypeError(f"{spec.flag} names fields of different types or defaults: {seen.paths + spec.paths}")
    return tuple(merged.values())


def _leaf_specs(cls: type, prefix: FieldPath, hidden: set[FieldPath]) -> Iterable[FlagSpec]:
    hints = type_hints(cls)
    for f in fields(cls):
        path = (*prefix, f.name)
        if path in hidden:
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and is_dataclass(hint):
            yield from _leaf_specs(hint, path, hidden)
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with config.opt()")
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        yield FlagSpec(flag, (path,), hint, f.default, f.metadata["help"])


def load_config_file(path: str) -> dict[str, Any]:
    """Read a `--config` YAML file: a mapping of option name (dashes or underscores) to value."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config file {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("_", "-"): v for k, v in data.items()}


def check_file_keys(path: str, data: Mapping[str, Any], specs: Sequence[FlagSpec], command: str) -> None:
    """An unknown key is an error, so a misspelt option is never silently ignored."""
    known = [s.key for s in specs]
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"config file {path}: unknown option {key!r} for `lightspeed {command}`{hint}")


def resolve(
    specs: Sequence[FlagSpec], given: Mapping[str, Any], environ: Mapping[str, str], file: Mapping[str, Any]
) -> dict[str, Any]:
    """Value per flag dest, from the first source that has it: flag > environment > file.

    Flags left at their default are absent, so the dataclass default applies.
    """
    values: dict[str, Any] = {}
    for spec in specs:
        if spec.dest in given:
            values[spec.dest] = given[spec.dest]
        elif spec.env in environ:
            values[spec.dest] = _convert(spec.parse, environ[spec.env], f"environment variable {spec.env}")
        elif spec.key in file:
            values[spec.dest] = _convert(spec.from_file, file[spec.key], f"config file option {spec.key!r}")
    return values


def _convert(conv: Any, raw: Any, where: str) -> Any:
    try:
        return conv(raw)
    except ValueError as err:  # msgspec.ValidationError is a ValueError too
        raise ValueError(f"invalid value {raw!r} in {where}: {err}") from None


def build_config(cls: type[_T], specs: Sequence[FlagSpec], values: Mapping[str, Any]) -> _T:
    """Construct (and so validate) the frozen config from resolved flag values."""
    tree: dict[str, Any] = {}
    for spec in specs:
        if spec.dest not in values:
            continue
        for path in spec.paths:
            node = tree
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = values[spec.dest]
    return _construct(cls, tree)


def _construct(cls: type[_T], tree: Mapping[str, Any]) -> _T:
    hints = type_hints(cls)
    kwargs = {name: _construct(hints[name], sub) if is_dataclass(hints[name]) else sub for name, sub in tree.items()}
    return cls(**kwargs)


class BoolAction(argparse.Action):
    """`--flag` / `--no-flag`, and the older `--flag false` spelling."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        flag = option_strings[0]
        super().__init__([flag, "--no-" + flag[2:]], dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, option: str | None = None
    ) -> None:
        if option is not None and option.startswith("--no-"):
            if value is not None:
                parser.error(f"{option} takes no value")
            setattr(ns, self.dest, False)
            return
        try:
            setattr(ns, self.dest, True if value is None else parse_bool(value))
        except ValueError as err:
            parser.error(f"{option}: {err}")


class HelpFormatter(argparse.HelpFormatter):
    """Shows a boolean as `--flag, --no-flag` instead of with a value placeholder."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolAction):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


def add_flags(parser: argparse.ArgumentParser, specs: Iterable[FlagSpec]) -> None:
    """Register flags whose argparse default is "absent", so `resolve` can tell what was given."""
    for spec in specs:
        shown = ("on" if spec.default else "off") if spec.hint is bool else repr(spec.default)
        help_ = f"{spec.help} (env {spec.env}; default {shown})"
        if spec.hint is bool:
            parser.add_argument(spec.flag, action=BoolAction, dest=spec.dest, default=argparse.SUPPRESS, help=help_)
            continue
        parser.add_argument(
            spec.flag,
            dest=spec.dest,
            type=_argparse_type(spec),
            choices=spec.choices,
            default=argparse.SUPPRESS,
            help=help_,
        )


def _argparse_type(spec: FlagSpec) -> Any:
    def conv(raw: str) -> Any:
        return spec.parse(raw)

    conv.__name__ = spec.hint.__name__ if spec.hint in (int, float) else "str"  # argparse's error text
    return conv
