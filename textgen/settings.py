"""Settings declared once: each is a dataclass field with its default, its help and its range.

    lr: float = setting(5e-3, "peak AdamW learning rate", low=1e-9, high=10.0, within="from 1e-9 to 10")

The command line builds its flags from these fields (``add_flags``: ``--lr``), the Python API takes
them as keyword arguments (``lr=``) and HTTP as JSON fields (``"lr"``). ``check`` enforces the
declared type (the annotation's: an ``int`` takes no ``'5'``, ``2.5`` or ``True``) and range with a
``SettingError`` naming the field, which each front end words in its own terms; a range that depends
on another setting (weight decay at most 1/lr) stays in the config's validate().

Imports errors only; the configs of every layer (model, training, sampling, serving) import it.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, Field, field, fields

from .errors import SettingError, check_range

# Fields whose flag is not their name with dashes, filled as parsers are built: {field: flag word}.
_FLAG_WORDS: dict[str, str] = {}


def setting(default, help: str, *, low=None, high=None, within: str = "", low_open: bool = False,  # noqa: A002
            choices: tuple | None = None, parse=None, metavar: str | None = None, flag: str | None = None,
            short: str | None = None, toggle: bool = False, group: str | None = None, shown=MISSING):
    """A dataclass field declaring one setting.

    low/high/within/low_open: the range (check_range's words); choices: the allowed values;
    parse: turns a command-line string into the value (e.g. parse_duration); flag: the flag's
    word where it is not the field's name; toggle: a --x/--no-x pair (else a bool is a --x switch);
    group: the --help section; shown: what --help shows as the default (None: nothing), and what
    argparse parses as the default when it is a string."""
    meta = {"help": help, "low": low, "high": high, "within": within, "low_open": low_open, "choices": choices,
            "parse": parse, "metavar": metavar, "flag": flag, "short": short, "toggle": toggle, "group": group,
            "shown": shown}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def declared(cls) -> list[Field]:
    """The fields of a config class that are settings (declared with setting())."""
    return [f for f in fields(cls) if "help" in f.metadata]


def check(config) -> None:
    """Every declared type, range and choice of config, in field order; SettingError naming the field."""
    for f in declared(type(config)):
        meta, value = f.metadata, getattr(config, f.name)
        expected = kind_problem(f, value)
        if expected:
            raise SettingError(f.name, f"must be {expected}, got {shown(value)}")
        if meta["choices"] is not None and value not in meta["choices"]:
            raise SettingError(f.name, f"must be {' or '.join(map(str, meta['choices']))}, got {value}")
        if meta["low"] is not None or meta["high"] is not None:
            check_range(f.name, value, meta["low"], meta["high"], meta["within"], meta["low_open"])


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# A field's declared kind -> (what a value must be, in words; the test). A bool is no number here:
# True as a step count or a temperature is a mistake, not 1.
_KINDS = {"int": ("a whole number", _whole),
          "float": ("a number", lambda v: _whole(v) or isinstance(v, float)),
          "str": ("text", lambda v: isinstance(v, str)),
          "bool": ("True or False", lambda v: isinstance(v, bool)),
          "tuple": ("a list of whole numbers", lambda v: isinstance(v, (list, tuple)) and all(map(_whole, v)))}


def kind_problem(f: Field, value) -> str | None:
    """What value should have been for f's declared type ("a whole number"), or None where it is one
    (None passes where the annotation allows it: "int | None")."""
    if value is None and "None" in str(f.type):
        return None
    expected, test = _KINDS.get(kind(f), (None, None))
    return None if test is None or test(value) else expected


def shown(value) -> str:
    """A value as a message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def flag_of(name: str) -> str:
    """A setting's field as the command line names it: top_p -> --top-p, time_budget -> --time."""
    return "--" + _FLAG_WORDS.get(name, name).replace("_", "-")


def add_flags(parser, cls, only: tuple[str, ...] | None = None, groups: dict | None = None) -> None:
    """Add a --flag for each declared field of cls (or of `only`, in that order) to parser, or to
    groups[field's group] where given. The flag's default is the field's, its help the field's."""
    by_name = {f.name: f for f in declared(cls)}
    for name in only or by_name:
        f = by_name[name]
        meta = f.metadata
        word = meta["flag"] or f.name
        if meta["flag"]:
            _FLAG_WORDS[f.name] = meta["flag"]
        names = [meta["short"]] if meta["short"] else []
        names.append("--" + word.replace("_", "-"))
        default = f.default if f.default is not MISSING else f.default_factory()
        # A string shown is what argparse parses into the default ("3m"); None hides the default in --help.
        shown = default if meta["shown"] in (MISSING, None) else meta["shown"]
        target = (groups or {}).get(meta["group"], parser)
        kind_ = kind(f)
        options = dict(dest=f.name, default=shown, help=meta["help"])
        if kind_ == "bool":
            options["action"] = argparse.BooleanOptionalAction if meta["toggle"] else "store_true"
        else:
            options["type"] = meta["parse"] or {"int": int, "float": float}.get(kind_, str)
            if meta["choices"] is not None:
                options["choices"] = meta["choices"]
            if meta["metavar"]:
                options["metavar"] = meta["metavar"]
        action = target.add_argument(*names, **options)
        action.hide_default = meta["shown"] is None


def kind(f: Field) -> str:
    """The base type of a field's annotation: "int | None" -> "int" (annotations are strings here)."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return annotation.replace(" ", "").replace("|None", "").replace("None|", "")


def from_values(cls, values: dict, **given):
    """cls built from the values of its fields found in values (a parsed namespace's vars), then given."""
    known = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in values.items() if k in known}, **given})


# -- parsers for values typed on a command line ------------------------------------------------

def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '1h30m' or plain seconds -> seconds ('-5m' -> -300.0: the range check says why not)."""
    parts = re.fullmatch(r"\s*(-?)\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                         text)
    if not text.strip() or not parts or not any(parts.groups()[1:]):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 90s, 15m, 2h or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups()[1:])
    return (-1 if parts[1] else 1) * (h * 3600 + m * 60 + s)


def parse_int_list(text: str) -> tuple:
    """'256,1024' -> (256, 1024); a list with no number in it (',') is refused, not taken as none."""
    try:
        numbers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not numbers:
        raise argparse.ArgumentTypeError(f"{text!r} holds no numbers; give a comma-separated list of whole numbers "
                                         f"such as 256,1024")
    return numbers


# Python's escapes, each decoded alone so that the text around them stays as typed (é, €); an unknown
# one (\\q) stays as typed, as in a Python string.
_ESCAPE = re.compile(r"\\(?:N(?:\{[^}]*\}?)?|u[0-9a-fA-F]{0,4}|U[0-9a-fA-F]{0,8}|x[0-9a-fA-F]{0,2}|[0-7]{1,3}"
                     r"|[\\'\"abfnrtv\n]|$)")


def unescape(text: str) -> str:
    """'\\n\\n' typed on a command line -> two newlines; a broken escape (a lone \\ at the end, \\x4)
    is the flag's error in one sentence."""
    def one(match: re.Match) -> str:
        decoded = match[0].encode("utf-8").decode("unicode_escape")
        if any("\ud800" <= ch <= "\udfff" for ch in decoded):
            raise UnicodeError("a lone surrogate")
        return decoded
    try:
        return _ESCAPE.sub(one, text)
    except UnicodeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid escape sequence; write \\\\ for a backslash, \\n for a newline, \\t for "
            f"a tab, \\xHH or \\uHHHH for a character") from None
