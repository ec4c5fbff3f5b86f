"""Every public callable whose docstring has a Google-style ``Args:`` section names exactly its parameters, in order."""

from __future__ import annotations

import importlib
import inspect
import re

from test_readme import API_MODULES  # the modules whose __all__ is the public API

_ENTRY = re.compile(r"\*{0,2}([A-Za-z_]\w*)(?:\s*\([^)]*\))?\s*:")


def documented_args(doc: str | None) -> list[str] | None:
    """The names an ``Args:`` section lists (entries are the lines at its first indentation), None without one."""
    if not doc:
        return None
    lines = doc.expandtabs().splitlines()
    for start, line in enumerate(lines):
        if line.strip() == "Args:":
            base = len(line) - len(line.lstrip())
            break
    else:
        return None
    names, indent = [], None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth <= base:
            break
        indent = depth if indent is None else indent
        if depth == indent:
            match = _ENTRY.match(line.strip())
            names.append(match.group(1) if match else f"<not an entry: {line.strip()[:40]!r}>")
    return names


def _public_callables():
    """``(qualified name, object)`` of every exported callable and of its classes' public methods and ``__init__``."""
    seen, found = set(), []
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not callable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            found.append((f"{module_name}.{name}", obj))
            if inspect.isclass(obj):
                for attribute, member in vars(obj).items():
                    if inspect.isfunction(member) and (not attribute.startswith("_") or attribute == "__init__"):
                        found.append((f"{module_name}.{name}.{attribute}", member))
    return found


def _mismatches() -> list[str]:
    problems = []
    for name, obj in _public_callables():
        # A class documents its constructor in its own docstring (inspect.getdoc would inherit a base's).
        documented = documented_args(obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj))
        if documented is None:
            continue
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        parameters = [p for p in signature.parameters if p not in ("self", "cls")]
        if documented != parameters:
            problems.append(f"{name}: Args lists {documented}, the signature has {parameters}")
    return problems


def test_the_args_parser_reads_google_style_entries():
    doc = """Summary.

    Args:
        first: text.
        second (int): text that goes on
            over two lines: with a colon.
        **options: more.

    Returns:
        something: not an argument.
    """
    assert documented_args(inspect.cleandoc(doc)) == ["first", "second", "options"]
    assert documented_args("No sections.") is None


def test_enough_docstrings_are_checked():
    # A parser that silently found no Args sections would pass everything.
    checked = [name for name, obj in _public_callables()
               if documented_args(obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj))]
    assert len(checked) >= 30, checked


def test_every_documented_argument_list_matches_the_signature():
    assert _mismatches() == []

