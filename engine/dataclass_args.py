"""Command-line flags generated from a dataclass, as vLLM's EngineArgs.add_cli_args does for its config.

Every field becomes `--field-name` with the field's default and its help: the attribute docstring, the string
literal written right below the field in the class body (read from the source with `ast`). bool fields get
`--x/--no-x`; `X | None` fields also take the word "none"; `list[X]` fields take one or more values;
`Literal[...]` fields take one of their values. Other spellings of a flag are given as aliases.

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EngineConfig, aliases={"enable_prefix_caching": ["--prefix-caching"]})
    config = EngineConfig(**dataclass_kwargs(EngineConfig, parser.parse_args()))
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import TYPE_CHECKING, Any, Literal, Union

if TYPE_CHECKING:  # annotations only
    from _typeshed import DataclassInstance

NONE_WORDS = ("none", "None")


def field_docs(cls: type[DataclassInstance]) -> dict[str, str]:
    """{field name: its attribute docstring} for the fields of `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen or zipped install): the flags go without help
            continue
        class_def = tree.body[0]
        if not isinstance(class_def, ast.ClassDef):
            continue
        body = class_def.body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type[DataclassInstance],
                       aliases: dict[str, list[str]] | None = None, defaults: dict[str, Any] | None = None,
                       skip: tuple[str, ...] = (), title: str | None = None) -> argparse._ArgumentGroup:
    """Adds one flag per field of `cls` (except `skip`) to a group of `parser`, dest = the field's name.
    aliases: other spellings of a field's flag (a bool's alias also gets its --no- form); defaults: overrides
    of the fields' defaults (e.g. one read from the environment)."""
    aliases, defaults = aliases or {}, defaults or {}
    group = parser.add_argument_group(title or cls.__name__, (cls.__doc__ or "").strip().split("\n")[0] or None)
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        names = [flag(f.name), *aliases.get(f.name, [])]
        kwargs = _argument(hints[f.name])
        kwargs["help"] = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if f.name in defaults:
            kwargs["default"] = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if "default" in kwargs:
            kwargs["help"] = f"{kwargs['help']} (default: %(default)s)".lstrip()
        group.add_argument(*names, dest=f.name, **kwargs)
    return group


def dataclass_kwargs(cls: type[DataclassInstance], namespace: argparse.Namespace,
                     skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed values of `cls`'s fields, to construct it with cls(**kwargs)."""
    return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
            if f.init and f.name not in skip and hasattr(namespace, f.name)}


def _argument(annotation) -> dict[str, Any]:
    inner, optional = _strip_none(annotation)
    kwargs: dict[str, Any] = {}
    origin = typing.get_origin(inner)
    if inner is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        choices = typing.get_args(inner)
        kwargs.update(choices=choices, type=_optional(type(choices[0]), optional))
    elif origin in (list, tuple):
        element = typing.get_args(inner)[0] if typing.get_args(inner) else str
        kwargs.update(nargs="+", type=_optional(element, optional))
    elif inner in (int, float, str):
        kwargs["type"] = _optional(inner, optional)
        kwargs["metavar"] = inner.__name__.upper()
    else:
        raise TypeError(f"no command-line form for a field of type {annotation!r}")
    return kwargs


def _strip_none(annotation) -> tuple[Any, bool]:
    """(X, True) for `X | None` / Optional[X], else (annotation, False)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) != len(typing.get_args(annotation))
    return annotation, False


def _optional(convert, optional: bool):
    """The value converter; for an optional field the word "none" gives None."""
    if not optional:
        return convert

    def parse(text: str):
        return None if text in NONE_WORDS else convert(text)
    parse.__name__ = convert.__name__  # argparse names the type in its error messages
    return parse
