"""A wheel's Python API, read from its sources without installing or importing it.

For packages that cannot be imported here — torch_npu needs CANN, and installed without it breaks
``import torch`` — this answers "does ``pkg.mod.name`` exist, and with which parameters?" by parsing the
wheel's ``.py`` files with :mod:`ast` and following imports (``from .x import y``, ``from .x import *``
under ``__all__``, ``import a.b as c``). Names bound to a compiled extension (``pkg._C``) are reported as
``compiled``: they exist only at run time, and nothing here can check them.
"""

from __future__ import annotations

import ast
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["function", "class", "value", "module", "compiled", "missing"]


@dataclass(frozen=True)
class Param:
    """One parameter of a function definition."""

    name: str
    #: ``positional_only``, ``positional``, ``var_positional``, ``keyword_only`` or ``var_keyword``.
    kind: str
    has_default: bool


@dataclass(frozen=True)
class Resolution:
    """What a dotted name resolves to in the wheel's sources."""

    name: str
    kind: Kind
    #: ``path/in/wheel.py:line`` of the definition (or of the import that binds a compiled name).
    where: str = ""
    #: Parameters, for functions (``self`` included for methods).
    params: tuple[Param, ...] | None = None


@dataclass(frozen=True)
class CallSite:
    """A call found in the wheel's sources: its callee as written, constant positional args, keywords."""

    callee: str
    where: str
    constant_args: tuple[object, ...]
    keywords: dict[str, object]


class WheelSources:
    """The ``.py`` files of one wheel, parsed on demand."""

    def __init__(self, wheel: Path, compiled_modules: tuple[str, ...] = ()) -> None:
        self.wheel = wheel
        #: Dotted module names whose attributes live in a compiled extension (e.g. ``torch_npu._C``).
        self.compiled_modules = compiled_modules
        with zipfile.ZipFile(wheel) as archive:
            self._sources = {
                n: archive.read(n).decode("utf-8-sig") for n in archive.namelist() if n.endswith(".py")
            }
        self._trees: dict[str, ast.Module] = {}

    def module_path(self, module: str) -> str | None:
        """The file in the wheel that defines the dotted ``module`` (a package's ``__init__.py``)."""
        base = module.replace(".", "/")
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self._sources:
                return candidate
        return None

    def tree(self, path: str) -> ast.Module:
        """The parsed file ``path`` of the wheel (parsed once)."""
        if path not in self._trees:
            self._trees[path] = ast.parse(self._sources[path], filename=path)
        return self._trees[path]

    def resolve(self, dotted: str) -> Resolution:
        """``pkg.mod.name`` → what it is; the longest prefix that is a module in the wheel is the module."""
        parts = dotted.split(".")
        for split in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:split])
            if self.module_path(module) is not None:
                resolution = self._attribute(module, parts[split], frozenset())
                if split + 1 == len(parts) or resolution.kind != "module":
                    return Resolution(dotted, resolution.kind, resolution.where, resolution.params)
                return self.resolve(f"{resolution.where}.{'.'.join(parts[split + 1 :])}")
        if self.module_path(dotted) is not None:
            return Resolution(dotted, "module", dotted)
        return Resolution(dotted, "missing")

    def calls(self, callee_suffix: str) -> list[CallSite]:
        """Every call in the wheel whose callee, as written (``a.b.c``), ends with ``callee_suffix``."""
        found = []
        for path in sorted(self._sources):
            if callee_suffix.rsplit(".", 1)[-1] not in self._sources[path]:
                continue
            for node in ast.walk(self.tree(path)):
                if not isinstance(node, ast.Call):
                    continue
                callee = dotted_name(node.func)
                if callee is None or not (callee == callee_suffix or callee.endswith("." + callee_suffix)):
                    continue
                found.append(
                    CallSite(
                        callee=callee,
                        where=f"{path}:{node.lineno}",
                        constant_args=tuple(_constant(a) for a in node.args),
                        keywords={k.arg: _constant(k.value) for k in node.keywords if k.arg is not None},
                    )
                )
        return found

    def string_constants(self, text: str) -> list[str]:
        """Where the string literal ``text`` appears in the wheel's sources (``path:line``)."""
        return [
            f"{path}:{node.lineno}"
            for path in sorted(self._sources)
            if text in self._sources[path]
            for node in ast.walk(self.tree(path))
            if isinstance(node, ast.Constant) and node.value == text
        ]

    def compiled_names(self, resolution: Resolution) -> list[str]:
        """Names of compiled modules (``pkg._C.x``) that a resolved function's body refers to, sorted."""
        if resolution.kind != "function":
            return []
        path, line = resolution.where.rsplit(":", 1)
        for node in ast.walk(self.tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.lineno == int(line):
                names = {dotted_name(n) for n in ast.walk(node) if isinstance(n, ast.Attribute)}
                return sorted(n for n in names if n is not None and self._is_compiled(n.rsplit(".", 1)[0]))
        return []

    # --- resolution ----------------------------------------------------------------------------------------
    def _attribute(self, module: str, name: str, seen: frozenset[tuple[str, str]]) -> Resolution:
        if (module, name) in seen:
            return Resolution(f"{module}.{name}", "missing")
        seen = seen | {(module, name)}
        if self._is_compiled(module):
            return Resolution(f"{module}.{name}", "compiled", module)
        path = self.module_path(module)
        if path is None:
            return Resolution(f"{module}.{name}", "missing")
        tree = self.tree(path)
        for node in _top_level(tree.body):
            found = self._binding(node, module, path, name, seen)
            if found is not None:
                return found
        if self.module_path(f"{module}.{name}") is not None:  # a submodule, reachable once imported
            return Resolution(f"{module}.{name}", "module", f"{module}.{name}")
        return Resolution(f"{module}.{name}", "missing")

    def _binding(
        self, node: ast.stmt, module: str, path: str, name: str, seen: frozenset[tuple[str, str]]
    ) -> Resolution | None:
        where = f"{path}:{node.lineno}"
        qualified = f"{module}.{name}"
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return Resolution(qualified, "function", where, function_params(node))
        if isinstance(node, ast.ClassDef) and node.name == name:
            return Resolution(qualified, "class", where)
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                source = dotted_name(node.value) if node.value is not None else None
                if source is not None and self._is_compiled(source.rsplit(".", 1)[0]):
                    return Resolution(qualified, "compiled", where)
                return Resolution(qualified, "value", where)
        if isinstance(node, ast.ImportFrom):
            origin = _absolute(module, path, node)
            for alias in node.names:
                if alias.name == "*":
                    if self._exports(origin, name):
                        found = self._attribute(origin, name, seen)
                        if found.kind != "missing":
                            return found
                elif (alias.asname or alias.name) == name:
                    if self._is_compiled(origin):
                        return Resolution(qualified, "compiled", where)
                    return self._attribute(origin, alias.name, seen)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname == name:
                    return Resolution(qualified, "module", alias.name)
        return None

    def _exports(self, module: str, name: str) -> bool:
        """Whether ``from module import *`` binds ``name``: listed in a literal ``__all__``, or public."""
        path = self.module_path(module)
        if path is None:
            return False
        for node in _top_level(self.tree(path).body):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                value = _constant(node.value)
                if isinstance(value, list | tuple):
                    return name in value
        return not name.startswith("_")

    def _is_compiled(self, module: str) -> bool:
        return any(module == c or module.startswith(c + ".") for c in self.compiled_modules)


def accepts(params: tuple[Param, ...], positional: int, keywords: tuple[str, ...]) -> str | None:
    """Whether a function with ``params`` takes a call with ``positional`` arguments and ``keywords``:
    ``None`` when it does, else why not."""
    by_position = [p for p in params if p.kind in ("positional_only", "positional")]
    if positional > len(by_position) and not any(p.kind == "var_positional" for p in params):
        return f"{positional} positional arguments, at most {len(by_position)} taken"
    filled = {p.name for p in by_position[:positional]}
    named = {p.name for p in params if p.kind in ("positional", "keyword_only")}
    for keyword in keywords:
        if keyword not in named and not any(p.kind == "var_keyword" for p in params):
            return f"no parameter named {keyword!r}"
        filled.add(keyword)
    missing = [
        p.name
        for p in params
        if not p.has_default
        and p.kind in ("positional_only", "positional", "keyword_only")
        and p.name not in filled
    ]
    return f"required parameters not given: {missing}" if missing else None


def dotted_name(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attributes on a name, else ``None``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def function_params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[Param, ...]:
    """The parameters of a function definition, in order."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    first_default = len(positional) - len(args.defaults)
    params = [
        Param(a.arg, "positional_only" if i < len(args.posonlyargs) else "positional", i >= first_default)
        for i, a in enumerate(positional)
    ]
    if args.vararg is not None:
        params.append(Param(args.vararg.arg, "var_positional", True))
    params += [
        Param(a.arg, "keyword_only", d is not None)
        for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
    ]
    if args.kwarg is not None:
        params.append(Param(args.kwarg.arg, "var_keyword", True))
    return tuple(params)


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements of a module body, with those inside top-level ``if`` / ``try`` blocks."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body) + _top_level(node.orelse) + _top_level(node.finalbody)
            for handler in node.handlers:
                out += _top_level(handler.body)
        else:
            out.append(node)
    return out


def _absolute(module: str, path: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def _constant(node: ast.AST) -> object:
    """A literal's value (lists and tuples of literals too), else the expression's source-like name."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return dotted_name(node) or ast.dump(node)[:60]
