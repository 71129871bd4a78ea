"""Each distillation method's own hyper-parameters: one ``Options`` dataclass in the method's module.

Scope: the helpers those dataclasses are written with (:func:`option`), the strict check of a
``method_options`` mapping against one of them (:func:`resolve`, :func:`normalize`), and the
table of every method's options that ``docs/methods.md`` holds (:func:`markdown_table`).
``ConfigError`` is defined here so that methods and config raise the same error without the
methods importing ``dfkd.config`` (which imports the method registry lazily: no import cycle).

A method declares::

    @dataclass(frozen=True)
    class Options:
        \"\"\"CMI (Fang et al., IJCAI 2021); defaults: the authors' adv-CMI CIFAR script.\"\"\"
        bn: float = option(1.0, "BN-statistics prior weight")

and reads ``self.opts.bn``. A run passes ``method_options: {bn: 0.5}`` (notebook parameter, YAML
file, ``--set method_options='{bn: 0.5}'``); ``{}`` means the method's defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class ConfigError(ValueError):
    """A parameter (or a method option) is unknown, missing or of the wrong type."""


def option(default: Any, help: str, *, choices: tuple | None = None):
    """A field of an ``Options`` dataclass: its default, a one-line description (docs and error
    messages) and, for a string option, the accepted values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own (it uses the shared parameters only)."""


def coerce(value: Any, expected: type) -> Any:
    """``value`` as ``expected`` (an int is accepted for a float); ``TypeError`` when it is not.
    bool is an int subclass in Python: True is rejected for an int field and 1 for a bool field."""
    if expected is bool and isinstance(value, bool):
        return value
    if expected is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected is str and isinstance(value, str):
        return value
    raise TypeError(f"expected {expected.__name__}, got {type(value).__name__} ({value!r})")


def option_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


def option_type(f: dataclasses.Field) -> type:
    return TYPES[f.type] if isinstance(f.type, str) else f.type


def defaults(cls) -> dict[str, Any]:
    """``{name: default}`` of an ``Options`` dataclass."""
    return {name: f.default for name, f in option_fields(cls).items()}


def _known(method: str, cls) -> str:
    names = list(option_fields(cls))
    if not names:
        return f"method {method!r} has no options of its own (method_options must be {{}})"
    return f"{method}'s options: {', '.join(names)} (defaults and sources: docs/methods.md)"


def normalize(cls, given: Mapping[str, Any] | None, method: str, *,
              hint: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """``given`` checked against ``cls``: every key must be one of its fields, every value of the
    field's type (ints become floats for float fields) and among its choices. Returns the checked
    mapping (only the given keys; the rest keep their defaults). ``hint(key)`` may explain an
    unknown key (an option of another method, a shared parameter); else the closest name is offered.

    Raises:
        ConfigError: naming the key, the method and the method's known options.
    """
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"method_options must be a mapping of option names to values (e.g. {{}}), "
                          f"got {type(given).__name__} ({given!r})")
    known = option_fields(cls)
    out = {}
    for key, value in given.items():
        if key not in known:
            why = hint(key) if hint is not None else None
            if why:
                why = f" ({why})"
            elif close := difflib.get_close_matches(str(key), list(known), n=1):
                why = f" (did you mean {close[0]!r}?)"
            raise ConfigError(f"method_options: unknown key {key!r} for method {method!r}{why or ''}; "
                              f"{_known(method, cls)}")
        f = known[key]
        try:
            value = coerce(value, option_type(f))
        except TypeError as e:
            raise ConfigError(f"method_options[{key!r}] of method {method!r}: {e}; "
                              f"{_known(method, cls)}") from None
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"method_options[{key!r}] of method {method!r} is {value!r}, not one of "
                              f"{tuple(choices)}")
        out[key] = value
    return out


def resolve(cls, given: Mapping[str, Any] | None, method: str):
    """The ``cls`` instance for ``given`` (checked by :func:`normalize`), the rest at defaults."""
    return cls(**normalize(cls, given, method))


def markdown_table(methods: Mapping[str, type]) -> str:
    """Markdown of every method's options (``METHODS``: name -> DistillMethod class): one section
    per method, its ``Options`` docstring (paper and source of the defaults), then a table of
    option, type, default and description. ``docs/methods.md`` embeds it (a test keeps it in sync)."""
    out = []
    for name, method_cls in methods.items():
        cls = getattr(method_cls, "Options", NoOptions)
        known = option_fields(cls)
        doc = " ".join(((cls if known else method_cls).__doc__ or "").split())
        out.append(f"### `{name}`\n")
        if doc:
            out.append(f"{doc}\n")
        if not known:
            out.append("No options of its own: `method_options` must be `{}`.\n")
            continue
        out.append("| option | type | default | description |")
        out.append("|---|---|---|---|")
        for key, f in known.items():
            desc = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                desc += " (" + " | ".join(map(str, f.metadata["choices"])) + ")"
            desc = desc.replace("|", "\\|")   # a literal bar inside a table cell
            out.append(f"| `{key}` | {option_type(f).__name__} | `{f.default!r}` | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def summary_table(methods: Mapping[str, type]) -> str:
    """One Markdown row per method: its paper and its options with their defaults (the README's
    table; ``docs/methods.md`` has the descriptions and the sources of the defaults)."""
    rows = ["| method | paper | options (defaults) |", "|---|---|---|"]
    for name, method_cls in methods.items():
        cls = getattr(method_cls, "Options", NoOptions)
        known = option_fields(cls)
        paper = " ".join((cls.__doc__ or "").split()) if known else " ".join((method_cls.__doc__ or "").split())
        paper = re.split(r"\.?\s+Defaults?:", paper, maxsplit=1)[0].rstrip(".")
        opts = ", ".join(f"`{k}` {f.default!r}" for k, f in known.items()) or "none (`{}`)"
        rows.append(f"| `{name}` | {paper.replace('|', '/')} | {opts} |")
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------------------------
# docs/methods.md and README.md
# --------------------------------------------------------------------------------------------
DOC_BEGIN = "<!-- BEGIN method options: generated by `python -m dfkd.options --write`; do not edit by hand -->"
DOC_END = "<!-- END method options -->"


def doc_section(text: str) -> str:
    """The generated part of ``docs/methods.md`` or ``README.md`` (between :data:`DOC_BEGIN` and
    :data:`DOC_END`)."""
    if DOC_BEGIN not in text or DOC_END not in text:
        raise ValueError(f"no generated section: the markers {DOC_BEGIN!r} ... {DOC_END!r} are missing")
    return text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip("\n") + "\n"


def _with_section(text: str, body: str) -> str:
    doc_section(text)   # the markers are there
    head, rest = text.split(DOC_BEGIN, 1)
    return f"{head}{DOC_BEGIN}\n\n{body}\n{DOC_END}{rest.split(DOC_END, 1)[1]}"


def main(argv=None) -> int:
    """``python -m dfkd.options [--write]``: print the tables of every method's options, or write
    them into ``docs/methods.md`` (full) and ``README.md`` (one row per method) between the markers."""
    import argparse
    from pathlib import Path

    from .methods import METHODS
    from .paths import project_root
    ap = argparse.ArgumentParser(prog="python -m dfkd.options", description=main.__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update docs/methods.md and README.md in place")
    args = ap.parse_args(argv)
    full, short = markdown_table(METHODS), summary_table(METHODS)
    if not args.write:
        print(short + "\n" + full, end="")
        return 0
    root = Path(project_root())
    for path, body in ((root / "docs" / "methods.md", full), (root / "README.md", short)):
        path.write_text(_with_section(path.read_text(), body))
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
