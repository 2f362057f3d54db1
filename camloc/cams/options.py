"""Method options as data. Each method module declares the options its methods read, beside their
registration (`method_option(...)`): name, type, default, help and check. The command line (every
computing command gets one `--flag` per option), config files' `options` tables, the Python API's
`**method_options`, heatmap-cache keys and run identities all read this one table, so adding a
method's option touches only that method's module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from camloc.errors import OptionError

KINDS = (int, float, str, bool, Path)


@dataclass(frozen=True)
class MethodOption:
    name: str
    """The Python name (`topk`); on the command line `--topk`, in config files `options.topk`."""
    kind: type
    """int, float, str, bool, or Path (a file, recorded as its absolute path)."""
    default: Any
    help: str
    check: Callable[[Any], Any] | None = None
    """value (already of `kind`) -> the value recorded; raises OptionError naming `flag`."""
    cache_key: bool = True
    """Whether the option changes maps: then it is part of the heatmap-cache key of every method that
    lists it in its `params` (and, like every option, of the run identity)."""
    module: str = ""
    """The module that declared it (camloc's own, or a plug-in's)."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value):
        """`value` (from the command line, a config file or Python) as this option records it."""
        if value is None:
            if self.kind is Path or self.default is None:
                return None
            raise OptionError(f"{self.flag} needs a value")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise OptionError(f"{self.flag} is a switch (true or false), got {value!r}")
        elif self.kind is Path:
            path = Path(value)
            if not path.is_file():
                raise OptionError(f"{self.flag} {value} does not exist")
            value = str(path.resolve())
        elif self.kind in (int, float):
            if isinstance(value, bool) or (self.kind is int and isinstance(value, float) and not value.is_integer()):
                raise OptionError(f"{self.flag} {value!r} must be {'an integer' if self.kind is int else 'a number'}")
            try:
                value = self.kind(value)
            except (TypeError, ValueError, OverflowError):
                raise OptionError(f"{self.flag} {value!r} must be "
                                  f"{'an integer' if self.kind is int else 'a number'}") from None
            if not math.isfinite(value):
                raise OptionError(f"{self.flag} must be a finite number, got {value}")
        else:
            value = value if isinstance(value, (str, list, tuple)) else str(value)
        return self.check(value) if self.check else value


OPTIONS: dict[str, MethodOption] = {}


def method_option(name: str, kind: type, default, help: str, check: Callable | None = None,
                  cache_key: bool = True) -> MethodOption:
    """Declare a method option (once, in the module of the methods that read it)."""
    if name in OPTIONS:
        raise ValueError(f"method option {name!r} declared twice")
    if kind not in KINDS:
        raise ValueError(f"method option {name!r}: kind must be one of int, float, str, bool, Path")
    import sys

    option = MethodOption(name, kind, default, help, check, cache_key, sys._getframe(1).f_globals.get("__name__", ""))
    OPTIONS[name] = option
    return option


def all_options() -> dict[str, MethodOption]:
    """Every declared option, in the methods' canonical order (the order of `--help`)."""
    from camloc.cams.registry import METHODS, list_methods

    order = list_methods()  # imports every method module (declaring its options), in canonical order
    first = {}
    for rank, method in enumerate(order):
        for name in METHODS[method].params:
            first.setdefault(name, rank)
    names = sorted(OPTIONS, key=lambda n: (first.get(n, len(order)), list(OPTIONS).index(n)))
    return {name: OPTIONS[name] for name in names}


def default_options() -> dict:
    """{option: its default}: what a run records for the options it was not given."""
    return {name: option.default for name, option in all_options().items()}


def parse_method_options(values: dict | None = None, where: str = "method option") -> dict:
    """Every option's value: those given (checked and normalised), the defaults for the rest. An unknown
    name is an error listing the known ones."""
    options = all_options()
    values = dict(values or {})
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise OptionError(f"unknown {where}(s) {', '.join(unknown)}; the methods' options are: {', '.join(options)}")
    return {name: option.parse(values[name]) if name in values else option.default
            for name, option in options.items()}


def at_least(flag: str, minimum: int | float, meaning: str = "") -> Callable:
    """A check: value >= minimum (`meaning` says what the minimum means, e.g. " (0 = every block)")."""

    def check(value):
        if value < minimum:
            raise OptionError(f"{flag} must be at least {minimum}{meaning}, got {value}")
        return value

    return check


def positive(flag: str) -> Callable:
    """A check: value > 0."""

    def check(value):
        if not value > 0:
            raise OptionError(f"{flag} must be positive, got {value}")
        return value

    return check


def between(flag: str, low: float, high: float, low_open: bool = False, meaning: str = "") -> Callable:
    """A check: low <= value <= high (low < value with `low_open`; `meaning` is added to the message)."""

    def check(value):
        if not (low < value if low_open else low <= value) or not value <= high:
            raise OptionError(f"{flag} must be in {'(' if low_open else '['}{low:g}, {high:g}]{meaning}, got {value}")
        return value

    return check


def count_or_auto(value, flag: str) -> int | str:
    """A count option that takes a positive number or `auto` (`--chunk-size`, `--image-batch`)."""
    if value == "auto":
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or isinstance(value, bool):
        raise OptionError(f"{flag} {value!r} must be a positive number or auto")
    return size


SEED_MAX = 2**32 - 1
"""Seeds feed NumPy's and torch's generators: 0..2**32-1."""


def whole_number(value, flag: str, low: int = 0, high: int | None = None, optional: bool = False) -> int | None:
    """A count, index or seed given on the command line or from Python: an integer (not a bool, float or
    text) in [low, high]; None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
            hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0 and "int" in str(value.dtype)):
        raise OptionError(f"{flag} must be a whole number, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"{low} or more"
        raise OptionError(f"{flag} must be {span}, got {value}")
    return value


def check_seed(value, flag: str = "--seed") -> int:
    return whole_number(value, flag, 0, SEED_MAX)


def one_of(flag: str, choices: tuple[str, ...]) -> Callable:
    """A check: value is one of `choices`."""

    def check(value):
        if value not in choices:
            raise OptionError(f"{flag} {value!r} is not one of {', '.join(choices)}")
        return value

    return check


__all__ = ["OPTIONS", "MethodOption", "all_options", "at_least", "between", "default_options", "method_option",
           "one_of", "parse_method_options", "positive"]
