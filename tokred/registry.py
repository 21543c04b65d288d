"""The reducer registry: short names, ``tokred.reducer(name, **params)`` and the text spec.

Every reducer registers under a short name (the built-ins in :data:`BUILTINS`, third parties with
:func:`register_reducer` or the entry-point group ``tokred.reducers``). A text spec names one or
more reducers for command lines and config strings; it is parsed here and only here
(:func:`parse_spec`), and :func:`to_spec` writes it back (``str(reducer)`` too, where a spec exists).

Grammar (no commas, no spaces, so a spec survives as one value of lmms-eval's comma-separated
``--model_args``)::

    spec     := "none" | reducer ("+" reducer)*
    reducer  := name [":" param ("/" param)*]
    param    := key "=" value
    value    := int | float | "true" | "false" | "none" | word | sequence
    sequence := item (";" item)+ | "(" [item (";" item)*] ")" | "[" [item (";" item)*] "]"

``tome:r=16+divprune:keep=0.25+dart:layer=2/keep=0.5``. Names and ``true``/``false``/``none`` are
case-insensitive. ``1`` is an int and ``1.0`` a float (``keep=1`` is one token, ``keep=1.0`` all of
them); ``inf``/``-inf`` are floats; anything else made of letters, digits, ``_``, ``-`` and ``.``
is a string (``positions=keep``, ``stage=projector``). Sequences: ``(..)`` is a tuple and ``[..]``
a list; without brackets two items make a tuple (ToMe's ``r=16;-0.5`` schedule, Pool's
``stride=1;2``) and any other number of items a list (a per-block ``r=8;8;4``), so a two-item
list needs its brackets (``r=[4;2]``). Items are ints, floats, true/false, none or words; no
nesting. A value never starts with ``+`` (a ``+`` joins two reducers: write ``r=5``, ``1e20``, ``inf``);
one that does is refused.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable
from importlib.metadata import entry_points

from tokred.reducers import (ATP, DART, AdjacentMerge, Budget, DivPrune, DToMe, FastV, Matryoshka, PiToMe, Pool, Random, Reducer,
                             Thresholds, ToMe, VTU, DyCoke, Uniform, VisionZip, HoliTom, HoliTomInner)

#: the entry-point group third-party packages list their reducers in (name = reducer name, value = the class)
ENTRY_POINT_GROUP = "tokred.reducers"
EXAMPLE = "tome:r=16+divprune:keep=0.25+dart:layer=2/keep=0.5"

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_INT = re.compile(r"-?\d+\Z")
_FLOAT = re.compile(r"-?(\d+\.\d*|\.\d+|\d+)(e[-+]?\d+)?\Z|-?inf\Z", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_RESERVED = frozenset({"true", "false", "none", "inf", "-inf", "nan"})

_registry: dict[str, type[Reducer]] = {}
_names: dict[type[Reducer], str] = {}
#: entry points that failed to load: name -> the error to raise when that name is looked up
_broken: dict[str, str] = {}
_entry_points_loaded = False


# registering -------------------------------------------------------------------------------
def register_reducer(name: str) -> Callable[[type[Reducer]], type[Reducer]]:
    """Class decorator: register a :class:`~tokred.Reducer` dataclass under ``name``.

    ``name`` is lowercase letters, digits and ``_``, starting with a letter; a name taken by another
    class is refused, and so is a second name for the same class (``str(reducer)`` needs one)::

        @tokred.register_reducer("mine")
        @dataclass(frozen=True)
        class Mine(tokred.Reducer):
            keep: float = 0.5
            stage = "projector"
    """
    if not isinstance(name, str) or not _NAME.match(name) or name == "none":
        raise ValueError(f"a reducer name is lowercase letters, digits and '_', starting with a letter, and not "
                         f"'none'; got {name!r}")

    def decorate(cls: type[Reducer]) -> type[Reducer]:
        if not (isinstance(cls, type) and issubclass(cls, Reducer)):
            raise TypeError(f"register_reducer('{name}') takes a subclass of tokred.Reducer, got {cls!r}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"register_reducer('{name}'): {cls.__qualname__} must be a dataclass (its fields are "
                            "the spec's parameters)")
        taken = _registry.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"reducer name '{name}' is already taken by {_qualname(taken)}; pick another name")
        other = _names.get(cls)
        if other is not None and other != name:
            raise ValueError(f"{_qualname(cls)} is already registered as '{other}'")
        _registry[name] = cls
        _names[cls] = name
        return cls

    return decorate


#: The built-in reducers, registered in this one place.
BUILTINS: dict[str, type[Reducer]] = {
    "tome": ToMe, "pitome": PiToMe, "thresholds": Thresholds, "random": Random, "pool": Pool,
    "divprune": DivPrune, "dart": DART, "fastv": FastV, "adjacent": AdjacentMerge, "dtome": DToMe,
    "matryoshka": Matryoshka, "vtu": VTU, "visionzip": VisionZip, "dycoke": DyCoke, "uniform": Uniform,
    "holitom": HoliTom, "holitom_inner": HoliTomInner, "atp": ATP,
}
for _builtin_name, _builtin in BUILTINS.items():
    register_reducer(_builtin_name)(_builtin)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_entry_points() -> None:
    """Register the classes of the ``tokred.reducers`` entry points, once, on the first lookup.

    One that fails to load (import error, not a Reducer, name taken) is remembered and raises
    when its name is looked up; it does not take the other reducers down with it."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point '{point.name} = {point.value}' (group {ENTRY_POINT_GROUP})"
        try:
            register_reducer(point.name)(point.load())
        except Exception as error:  # noqa: BLE001 - a broken plugin is reported when its name is used
            _broken[point.name] = f"{where} failed to load: {type(error).__name__}: {error}"


def list_reducers() -> list[str]:
    """The registered reducer names, sorted (built-ins, decorated classes and entry points)."""
    _load_entry_points()
    return sorted(_registry)


def reducer_class(name: str) -> type[Reducer]:
    """The class registered under ``name`` (case-insensitive); a ``ValueError`` lists the known names."""
    _load_entry_points()
    key = name.lower() if isinstance(name, str) else name
    if key in _registry:
        return _registry[key]
    if key in _broken:
        raise ValueError(f"reducer '{name}': {_broken[key]}")
    raise ValueError(f"unknown reducer '{name}'{did_you_mean(key, _registry)}; known reducers: "
                     f"{', '.join(sorted(_registry))}")


def did_you_mean(word, choices) -> str:
    """``" (did you mean 'tome'?)"`` for the choice closest to ``word`` (difflib's ratio >= 0.6,
    ``-`` read as ``_``), or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word).replace("-", "_"), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parameters_text(name: str, allowed: list[str]) -> str:
    return f"its parameters are: {', '.join(allowed)}" if allowed else f"{name} takes no parameters"


def name_of(cls: type[Reducer]) -> str | None:
    """The name ``cls`` is registered under, or None."""
    if cls not in _names:
        _load_entry_points()
    return _names.get(cls)


def parameters(cls: type[Reducer]) -> list[dataclasses.Field]:
    """The fields of ``cls`` a spec may set (its dataclass ``__init__`` fields)."""
    return [field for field in dataclasses.fields(cls) if field.init]


def default_of(field: dataclasses.Field):
    """The default of a dataclass field, or ``dataclasses.MISSING`` if it is required."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def reducer(name: str, **params) -> Reducer:
    """The reducer registered under ``name`` with ``params``: ``tokred.reducer("dart", layer=2, keep=0.25)``.

    A ``ValueError`` for an unknown name (listing the known ones), an unknown or missing parameter
    (listing the reducer's parameters); the reducer's own checks raise as they do when the class
    is called directly."""
    cls = reducer_class(name)
    fields = parameters(cls)
    allowed = [field.name for field in fields]
    unknown = [key for key in params if key not in allowed]
    if unknown:
        hints = "".join(did_you_mean(key, allowed) for key in unknown)
        raise ValueError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                         f"reducer '{name}'{hints}; {_parameters_text(name, allowed)}")
    missing = [field.name for field in fields if default_of(field) is dataclasses.MISSING and field.name not in params]
    if missing:
        raise ValueError(f"reducer '{name}' needs {', '.join(missing)}; {_parameters_text(name, allowed)}")
    return cls(**params)


# the text spec -------------------------------------------------------------------------------
def _bad(part: str, spec: str, why: str) -> ValueError:
    where = f"'{part}'" if part == spec else f"'{part}' of '{spec}'"
    return ValueError(f"bad reducer spec {where}: {why}; expected e.g. '{EXAMPLE}' or 'none'")


def _parse_item(text: str):
    lower = text.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower == "none":
        return None
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if _WORD.match(text):
        return text
    raise ValueError(f"cannot parse '{text}': use an int, a float, true/false, none, a word, or items "
                     "separated by ';' such as 16;-0.5")


def parse_value(text: str):
    """One value of a spec (see the module docstring): ``16`` -> 16, ``16;-0.5`` -> (16, -0.5), ``[4;2]`` -> [4, 2]."""
    if not text:
        raise ValueError("empty value")
    kind = None
    if text[0] in "([":
        close = ")" if text[0] == "(" else "]"
        if text[-1] != close:
            raise ValueError(f"'{text}' opens with '{text[0]}' but does not end with '{close}' (items are "
                             f"separated by ';', e.g. {text[0]}1;2{close})")
        kind = tuple if text[0] == "(" else list
        text = text[1:-1]
        if not text:
            return kind()
    elif ";" not in text:
        return _parse_item(text)
    items = text.split(";")
    if any(not item for item in items):
        raise ValueError(f"empty item in the sequence '{text}'")
    if any(char in item for item in items for char in "()[]"):
        raise ValueError(f"nested sequences are not supported: '{text}'")
    values = [_parse_item(item) for item in items]
    if kind is None:
        kind = tuple if len(values) == 2 else list
    return kind(values)


def save_reducers(path, *reducers: Reducer) -> None:
    """Write ``reducers`` (e.g. calibrated thresholds) to a JSON file: their spec, which
    :func:`load_reducers` parses back to equal reducers (floats are written exactly). A
    :class:`~tokred.Budget` ``keep`` has no spec form: it is written under ``budgets`` (by the
    reducer's index) and the spec holds ``keep=1.0`` in its place. A reducer without a spec (not
    registered, or a value the spec cannot hold) is refused by :func:`to_spec`, nothing written."""
    import json
    from pathlib import Path

    from tokred import __version__

    budgets = {str(i): r.keep.to_json() for i, r in enumerate(reducers) if isinstance(getattr(r, "keep", None), Budget)}
    written = [dataclasses.replace(r, keep=1.0) if str(i) in budgets else r for i, r in enumerate(reducers)]
    spec = "+".join(map(to_spec, written)) if reducers else "none"
    data = {"tokred": __version__, "spec": spec, **({"budgets": budgets} if budgets else {})}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_reducers(path) -> tuple[Reducer, ...]:
    """The reducers a :func:`save_reducers` file holds."""
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("spec"), str):
        raise ValueError(f"{path} is not a tokred reducers file (a JSON object with a 'spec' string)")
    reducers = list(parse_spec(data["spec"]))
    budgets = data.get("budgets", {})
    expected = (f"'budgets' maps the index of a reducer with a keep (0..{len(reducers) - 1}, a string) to a Budget "
                f"as Budget.to_json writes it (keys: {', '.join(f.name for f in dataclasses.fields(Budget))})")
    if not isinstance(budgets, dict):
        raise ValueError(f"{path}: 'budgets' is {budgets!r}; {expected}")
    for index, budget in budgets.items():
        if not (index.isdigit() and int(index) < len(reducers)
                and "keep" in {field.name for field in parameters(type(reducers[int(index)]))}):
            raise ValueError(f"{path}: bad 'budgets' entry {index!r} (the spec holds {data['spec']!r}); {expected}")
        try:
            reducers[int(index)] = dataclasses.replace(reducers[int(index)], keep=Budget.from_json(budget))
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise ValueError(f"{path}: bad 'budgets' entry {index!r}: {type(error).__name__}: {error}; "
                             f"{expected}") from None
    return tuple(reducers)


def _split_reducers(spec: str) -> list[str]:
    # every '+' joins two reducers, except the one of an exponent (1e+3)
    return re.split(r"(?<![0-9][eE])\+", spec)


def parse_spec(text: str) -> tuple[Reducer, ...]:
    """The reducers of a text spec such as ``tome:r=16+divprune:keep=0.25``; ``none`` -> ().

    The grammar is in this module's docstring. Errors are ``ValueError`` naming the offending
    part, the reducer's own message included when it rejects a value."""
    if not isinstance(text, str):
        raise TypeError(f"a reducer spec is a string, got {type(text).__name__}")
    spec = text.strip()
    if not spec:
        raise ValueError(f"empty reducer spec; expected e.g. '{EXAMPLE}' or 'none'")
    for char, what in ((",", "a comma"), (" ", "a space"), ("\t", "a tab"), ("\n", "a newline")):
        if char in spec:
            raise _bad(spec, spec, f"it contains {what} (a spec has none: reducers are joined by '+', parameters "
                                   "by '/', sequence items by ';')")
    if spec.lower() == "none":
        return ()
    parts = _split_reducers(spec)
    for before, after in zip(parts, parts[1:]):
        if before.endswith(("=", ";", "(", "[")):
            raise _bad(f"{before}+{after}", spec, "a value never starts with '+' (a '+' joins two reducers): "
                                                  "write 5, not +5")
    return tuple(_parse_one(part, spec) for part in parts)


def _parse_one(part: str, spec: str) -> Reducer:
    if not part:
        raise _bad(part or "+", spec, "empty reducer around '+'")
    name, colon, rest = part.partition(":")
    name = name.lower()
    if name == "none":
        raise _bad(part, spec, "'none' stands alone: it means no reducer, with no parameters")
    try:
        cls = reducer_class(name)
    except ValueError as error:
        raise _bad(part, spec, str(error)) from None
    allowed = [field.name for field in parameters(cls)]
    params = {}
    if colon:
        for param in rest.split("/"):
            key, equals, value = param.partition("=")
            if not equals or not key or not value:
                raise _bad(part, spec, f"expected key=value, got '{param}' ({_parameters_text(name, allowed)})")
            if key not in allowed:
                raise _bad(part, spec, f"unknown parameter '{key}' for {name}{did_you_mean(key, allowed)}; "
                                       f"{_parameters_text(name, allowed)}")
            if key in params:
                raise _bad(part, spec, f"parameter '{key}' given twice")
            try:
                params[key] = parse_value(value)
            except ValueError as error:
                raise _bad(part, spec, f"{key}: {error}") from None
    try:
        return reducer(name, **params)
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad reducer spec '{part}'{'' if part == spec else f' of {spec!r}'}: {error}") from error


# writing a spec ----------------------------------------------------------------------------
def to_spec(reducer: Reducer) -> str:
    """The text spec of ``reducer`` that :func:`parse_spec` reads back to an equal reducer: its
    registered name, then its required parameters and those that differ from their defaults
    (``dart:keep=0.25``). A ``TypeError`` for anything but a reducer, a ``ValueError`` for a reducer
    with no spec: its class is not registered, or a value cannot be written (e.g. a Budget)."""
    if not isinstance(reducer, Reducer):
        hint = " (a spec string is already a spec: tokred.parse_spec reads it)" if isinstance(reducer, str) else ""
        raise TypeError(f"expected a tokred reducer such as tokred.ToMe(r=8), got {reducer!r}{hint}")
    cls = type(reducer)
    name = name_of(cls)
    if name is None or not dataclasses.is_dataclass(cls):
        raise ValueError(f"{reducer!r} has no spec: its class {_qualname(cls)} is not a registered reducer; register "
                         "a dataclass with @tokred.register_reducer('name') (registered: "
                         f"{', '.join(list_reducers())})")
    params = []
    for field in parameters(cls):
        value, default = getattr(reducer, field.name), default_of(field)
        if default is dataclasses.MISSING or not same_value(value, default):
            params.append(f"{field.name}={format_value(value, f'{name}:{field.name}')}")
    return f"{name}:{'/'.join(params)}" if params else name


def same_value(value, default) -> bool:
    """Equal and of the same types (``1`` is not ``1.0``, ``True`` is not ``1``, ``[4, 2]`` is not ``(4, 2)``)."""
    if type(value) is not type(default):
        return False
    if isinstance(value, (tuple, list)):
        return len(value) == len(default) and all(same_value(a, b) for a, b in zip(value, default))
    return value == default


def _format_item(value, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            raise ValueError(f"{where}: NaN cannot be written in a spec")
        return repr(float(value)).replace("e+", "e")
    if isinstance(value, str) and _WORD.match(value) and value.lower() not in _RESERVED:
        return value
    if isinstance(value, Budget):
        raise ValueError(f"{where}: a Budget holds its calibration values and has no spec form; save the reducer "
                         "with tokred.save_reducers (JSON) and read it back with tokred.load_reducers")
    raise ValueError(f"{where}={value!r} cannot be written in a spec (values are ints, floats, true/false, none, "
                     "words of letters, digits, '_', '-' and '.', or tuples/lists of those)")


def format_value(value, where: str = "value") -> str:
    """A value as :func:`parse_value` reads it back (``where`` names it in errors)."""
    if isinstance(value, (tuple, list)):
        items = ";".join(_format_item(item, where) for item in value)
        bare = len(value) == 2 if isinstance(value, tuple) else len(value) not in (0, 1, 2)
        if bare:
            return items
        return f"({items})" if isinstance(value, tuple) else f"[{items}]"
    return _format_item(value, where)
