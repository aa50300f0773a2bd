"""The import rules between slimpack's packages, read from the source with `ast` (nothing is imported).

Every `import` and `from ... import` counts, at module level or inside a function, under
`if TYPE_CHECKING:` too: a function-level import is still a dependency, only a later one. An import
by string (`importlib.import_module`, as `slimpack.cli` registers its commands) is not seen.

`RULES` says which packages a package may not import; `CYCLE_FREE` lists the packages whose modules
take part in no import cycle. Add a row to either as the layout gains a rule.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

SRC = Path(__file__).parents[1] / "src"


class Rule(NamedTuple):
    importer: str  # a package (or module): it and everything below it
    forbidden: tuple[str, ...]  # packages (or modules) it may not import, nor anything below them
    why: str


RULES = (
    Rule("slimpack.tokenize", ("slimpack.train", "slimpack.eval", "slimpack.bench"),
         "tokenize runs on CPU nodes without torch; the trainer reads its output, never the reverse"),
    Rule("slimpack.shards", ("slimpack.train", "slimpack.eval", "slimpack.bench"),
         "the shard tools run on CPU nodes without torch; the trainer reads shards, never the reverse"),
    Rule("slimpack.pipeline", ("slimpack.train", "slimpack.eval", "slimpack.bench"),
         "the loader feeds the trainer and evaluations; it knows neither"),
    Rule("slimpack.ranks", ("slimpack.",), "read by log.py and every launcher: it stands on nothing"),
    Rule("slimpack.log", ("slimpack.train", "slimpack.eval", "slimpack.pipeline", "slimpack.shards",
                          "slimpack.tokenize"), "every package logs: logging depends on none of them"),
    Rule("slimpack.model", ("slimpack.pipeline", "slimpack.shards", "slimpack.tokenize", "slimpack.train",
                            "slimpack.eval", "slimpack.bench"),
         "the model layer sits below training and evaluation: weights in, activations out"),
    Rule("slimpack.eval", ("slimpack.train", "slimpack.bench"),
         "train -> eval -> model: an evaluation needs nothing of the trainer"),
)

# Packages whose modules are in no import cycle (of any length, through any module).
CYCLE_FREE = ("slimpack.shards", "slimpack.tokenize", "slimpack.demo", "slimpack.ranks", "slimpack.log",
              "slimpack.model", "slimpack.eval", "slimpack.train")


def _under(name: str, prefix: str) -> bool:
    """`name` is the module or package `prefix` or below it (`slimpack.` matches every module)."""
    return name.startswith(prefix) if prefix.endswith(".") else name == prefix or name.startswith(prefix + ".")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under src/slimpack (a package by its __init__)."""
    out = {}
    for path in sorted((SRC / "slimpack").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(slimpack module imported, line) for every import in the file, wherever it stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from slimpack.shards import mds` imports the module slimpack.shards.mds.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import slimpack.shards.mds.x`: the module part
                target = target.rpartition(".")[0]
            if target and _under(target, "slimpack"):
                found.append((target, node.lineno))
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_reader_sees_every_kind_of_import():
    # Guards the rules against going vacuous: a function-level import, `from PACKAGE import MODULE`,
    # and a module-level import are each seen.
    edges = {name: {t for t, _ in targets} for name, targets in GRAPH.items()}
    assert "slimpack.shards.validate" in edges["slimpack.shards.cli"]  # inside a handler
    assert "slimpack.shards.schema" in edges["slimpack.shards.validate"]  # from slimpack.shards import schema
    assert "slimpack.shards.findings" in edges["slimpack.shards.retokenize"]
    assert "slimpack.exitcodes" in edges["slimpack.shards.dataset"]  # from slimpack import exitcodes


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.importer)
def test_import_rule(rule: Rule):
    assert any(_under(m, rule.importer) for m in MODULES), f"{rule.importer}: no such package or module"
    broken = [f"{MODULES[name].relative_to(SRC)}:{line} imports {target}"
              for name, targets in GRAPH.items() if _under(name, rule.importer)
              for target, line in targets
              if any(_under(target, f) for f in rule.forbidden) and not _under(target, rule.importer)]
    assert not broken, f"{rule.importer} imports nothing of {', '.join(rule.forbidden)} ({rule.why}):\n" + \
        "\n".join(broken)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    edges = {name: sorted({t for t, _ in targets if t != name}) for name, targets in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", CYCLE_FREE)
def test_no_import_cycle(package: str):
    assert any(_under(m, package) for m in MODULES), f"{package}: no such package or module"
    cycles = [c for c in _cycles() if any(_under(m, package) for m in c)]
    assert not cycles, f"modules of {package} in an import cycle (move the piece both need down a level):\n" + \
        "\n".join(" <-> ".join(c) for c in cycles)
