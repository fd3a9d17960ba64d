"""Declared, typed plugin options.

A plugin class declares its options as a nested ``Options`` class; each field has a type, a
default and one line of doc (and optionally bounds or choices)::

    class RISE(xbench.Explainer):
        name = "rise"

        class Options(xbench.Options):
            n_masks: int = xbench.option(4000, "random masks N (one forward pass each)", minimum=1)
            batch_size: int | None = xbench.option(None, "masked images per forward pass",
                                                   minimum=1, in_variant=False)

        profiles = {"quick": {"n_masks": 500}}

Subclasses of :class:`Options` become frozen dataclasses. Values are checked when the options
are built: from Python (``RISE(n_masks=500)``) or from the command line (``-o rise.n_masks=500``,
converted by the declared type, never guessed). Options that change the output (all but those
declared ``in_variant=False``) and differ from their default make up the plugin's ``variant``,
recorded in every result row.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from typing import Any, ClassVar, Union

from xbench.errors import UserError, did_you_mean


class OptionError(UserError, ValueError):
    """An option value or key a plugin does not accept; the message names plugin and option."""


def option(default: Any, doc: str, *, minimum: Any = None, maximum: Any = None,
           above: Any = None, choices: tuple[Any, ...] | None = None,
           in_variant: bool = True) -> Any:
    """Declare one option: its default, one line of doc, optional bounds (``minimum`` and
    ``maximum`` inclusive, ``above`` exclusive) or choices.

    ``in_variant=False`` for settings that never change the output (batch sizes): they are
    left out of the plugin's ``variant``.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    metadata = {"doc": doc, "minimum": minimum, "maximum": maximum, "above": above,
                "choices": tuple(choices) if choices is not None else None,
                "in_variant": in_variant}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One declared option, as listed by ``xbench plugins NAME`` and checked before a run."""

    name: str
    type: Any
    default: Any
    doc: str
    minimum: Any = None
    maximum: Any = None
    above: Any = None
    choices: tuple[Any, ...] | None = None
    in_variant: bool = True

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "default": _jsonable(self.default),
                "doc": self.doc, "minimum": self.minimum, "maximum": self.maximum,
                "above": self.above,
                "choices": list(self.choices) if self.choices is not None else None,
                "in_variant": self.in_variant}

    def bounds_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(format_value(c) for c in self.choices)
        parts = []
        if self.minimum is not None:
            parts.append(f">= {format_value(self.minimum)}")
        if self.above is not None:
            parts.append(f"> {format_value(self.above)}")
        if self.maximum is not None:
            parts.append(f"<= {format_value(self.maximum)}")
        return " and ".join(parts)


class Options:
    """Base of every plugin's ``Options``: subclasses become frozen dataclasses."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True)(cls)
        cls._specs_cache = None

    def __post_init__(self) -> None:
        owner = f"options {type(self).__qualname__}"
        for spec in self.specs():
            value = getattr(self, spec.name)
            object.__setattr__(self, spec.name, check_value(spec, value, owner))

    @classmethod
    def specs(cls) -> tuple[OptionSpec, ...]:
        if cls.__dict__.get("_specs_cache") is None:
            module = sys.modules.get(cls.__module__)
            hints = typing.get_type_hints(cls, globalns=vars(module) if module else None)
            specs = []
            for f in dataclasses.fields(cls):
                meta = f.metadata
                specs.append(OptionSpec(
                    name=f.name, type=hints[f.name], default=f.default,
                    doc=meta.get("doc", ""), minimum=meta.get("minimum"),
                    maximum=meta.get("maximum"), above=meta.get("above"),
                    choices=meta.get("choices"),
                    in_variant=meta.get("in_variant", True)))
            cls._specs_cache = tuple(specs)
        return cls._specs_cache

    @classmethod
    def spec(cls, name: str) -> OptionSpec:
        for spec in cls.specs():
            if spec.name == name:
                return spec
        raise unknown_option(f"options {cls.__qualname__}", name, [s.name for s in cls.specs()])

    @classmethod
    def build(cls, owner: str, values: dict[str, Any]) -> Options:
        """Options from {name: value}, each value checked against its declaration."""
        names = [s.name for s in cls.specs()]
        for key in values:
            if key not in names:
                raise unknown_option(owner, key, names)
        checked = {key: check_value(cls.spec(key), value, owner) for key, value in values.items()}
        return cls(**checked)

    @classmethod
    def parse(cls, owner: str, key: str, raw: str) -> Any:
        """Convert one command-line value by the declared type of option ``key``."""
        names = [s.name for s in cls.specs()]
        if key not in names:
            raise unknown_option(owner, key, names)
        spec = cls.spec(key)
        try:
            value = convert(spec.type, raw)
        except ValueError as exc:
            raise OptionError(f"{owner}: option {key} expects {spec.type_name}, "
                              f"got {raw!r}") from exc
        return check_value(spec, value, owner)

    def changed(self) -> dict[str, Any]:
        """{name: value} of the options that change the output and differ from the default."""
        return {s.name: getattr(self, s.name) for s in self.specs()
                if s.in_variant and getattr(self, s.name) != s.default}

    def as_dict(self) -> dict[str, Any]:
        return {s.name: getattr(self, s.name) for s in self.specs()}


def unknown_option(owner: str, key: str, names: list[str]) -> OptionError:
    valid = ", ".join(names) if names else "none"
    return OptionError(f"{owner}: unknown option {key!r}.{did_you_mean(key, names)} "
                       f"Valid options: {valid}.")


# -- types ---------------------------------------------------------------------------------

def _optional_inner(tp: Any) -> Any | None:
    """X for ``X | None`` / ``Optional[X]``, else None."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{type_name(inner)} or none"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return f"comma-separated {type_name(args[0])}s"
    return {int: "integer", float: "number", bool: "true/false", str: "text"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def convert(tp: Any, raw: str) -> Any:
    """A command-line string as a value of type ``tp``; ValueError when it is not one."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if raw.strip().lower() in ("none", "null", "") else convert(inner, raw)
    if typing.get_origin(tp) is tuple:
        item_type = typing.get_args(tp)[0]
        parts = [p.strip() for p in raw.strip().strip("()[]").split(",") if p.strip()]
        return tuple(convert(item_type, p) for p in parts)
    if tp is bool:
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ValueError("")
    if tp is int:
        return int(raw.strip())
    if tp is float:
        return float(raw.strip())
    if tp is str:
        return raw
    return tp(raw)


def _matches(tp: Any, value: Any) -> tuple[bool, Any]:
    """(whether value is a tp, the value coerced where harmless: int -> float, list -> tuple)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return (True, None) if value is None else _matches(inner, value)
    if typing.get_origin(tp) is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            return False, value
        item_type = typing.get_args(tp)[0]
        items = [_matches(item_type, v) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def check_value(spec: OptionSpec, value: Any, owner: str) -> Any:
    """The value, checked against type, choices and bounds; OptionError naming the option."""
    ok, value = _matches(spec.type, value)
    if not ok:
        raise OptionError(f"{owner}: option {spec.name} expects {spec.type_name}, got {value!r}")
    if value is None:
        return value
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(item, float) and not math.isfinite(item) for item in items):
        raise OptionError(f"{owner}: option {spec.name} must be a finite number, "
                          f"got {format_value(value)}")
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if spec.choices is not None and item not in spec.choices:
            raise OptionError(f"{owner}: option {spec.name} must be {spec.bounds_text()}, "
                              f"got {format_value(item)}")
        low_ok = spec.minimum is None or item >= spec.minimum
        high_ok = spec.maximum is None or item <= spec.maximum
        above_ok = spec.above is None or item > spec.above
        if not (low_ok and high_ok and above_ok):
            raise OptionError(f"{owner}: option {spec.name} must be {spec.bounds_text()}, "
                              f"got {format_value(item)}")
    return value


# -- rendering -----------------------------------------------------------------------------

def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "/".join(format_value(v) for v in value)
    return str(value)


def format_settings(settings: dict[str, Any]) -> str:
    """{'n_masks': 500, 'p1': 0.25} -> 'n_masks=500,p1=0.25' (the variant of a row)."""
    return ",".join(f"{key}={format_value(value)}" for key, value in settings.items())


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class Configurable:
    """Mixin of the plugin base classes: declared options and per-profile overrides."""

    #: the plugin's declared options (a subclass of :class:`Options`)
    Options: ClassVar[type[Options]]
    #: per-profile option overrides, e.g. {"quick": {"n_masks": 500}}
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}
    #: "explainer", "model" or "metric", for messages
    plugin_kind: ClassVar[str]

    options: Options

    @classmethod
    def owner(cls) -> str:
        return f"{cls.plugin_kind} {getattr(cls, 'name', cls.__name__)!r}"

    @classmethod
    def make_options(cls, values: dict[str, Any]) -> Options:
        return cls.Options.build(cls.owner(), values)

    @classmethod
    def parse_option(cls, key: str, raw: str) -> Any:
        return cls.Options.parse(cls.owner(), key, raw)

    @classmethod
    def option_specs(cls) -> tuple[OptionSpec, ...]:
        return cls.Options.specs()

    @classmethod
    def profile_options(cls, profile: str) -> dict[str, Any]:
        return dict(cls.profiles.get(profile, {}))


class RecordsVariant:
    """Mixin of Explainer and Metric: ``variant`` derived from the options that changed."""

    options: Options

    def format_variant(self, changed: dict[str, Any]) -> str:
        """Render the changed options as this plugin's variant. Override only for a custom
        rendering; ``changed`` already holds every option that changes the output."""
        return format_settings(changed)

    @property
    def variant(self) -> str:
        """Settings that change the output, recorded in every result row ('' when none)."""
        return self.format_variant(self.options.changed())
