"""The package's shape: no module-level import cycle anywhere in tsmtrain/ (the CLI's included),
and the networks stand alone (tsmtrain.models imports neither data, dist nor train), read from
the source with ``ast``."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tsmtrain"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(node):
    """The import statements run when the module is imported: its body's, and those of its
    ``if``/``try`` blocks, except ``if TYPE_CHECKING:``; not those inside functions or classes."""
    for stmt in node.body if hasattr(node, "body") else []:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(stmt.test):
                yield from _top_level_imports(stmt)
                yield from _top_level_imports(ast.Module(body=stmt.orelse, type_ignores=[]))
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, stmt.orelse, stmt.finalbody, *(h.body for h in stmt.handlers)):
                yield from _top_level_imports(ast.Module(body=block, type_ignores=[]))


def import_graph() -> dict[str, set[str]]:
    """``{module: the tsmtrain modules it imports at module level}``, the packages on the way
    included (``from ..train.step import x`` runs ``tsmtrain/train/__init__.py`` first); a
    module's own enclosing packages are left out (they are being imported already)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for stmt in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            else:
                base = package.split(".")[: len(package.split(".")) - stmt.level + 1] if stmt.level else []
                base = ".".join(base + ([stmt.module] if stmt.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in stmt.names]
            for t in targets:  # importing a.b.c runs a/__init__ and a/b/__init__ first
                parts = t.split(".")
                edges |= {".".join(parts[:k]) for k in range(2, len(parts) + 1)}
            edges = {t for t in edges if t in files and t != name and not name.startswith(t + ".")}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checks_see_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle():
    graph = import_graph()
    assert "tsmtrain.cli.common" in graph["tsmtrain.cli.training"]  # the walk resolves relative imports
    assert cycles(graph) == []


def _absolute_imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere (inside functions too), as absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])))
    return found


def test_the_networks_import_neither_data_dist_nor_train():
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        bad = sorted(n for n in _absolute_imports(path)
                     if n.startswith(("tsmtrain.data", "tsmtrain.dist", "tsmtrain.train")))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_the_online_data_path_never_imports_the_preparation_package():
    """A loader worker imports :mod:`tsmtrain.data.loader` (and, by a dataset, its readers):
    none of them may load :mod:`tsmtrain.prep` (ffmpeg, tar writing, flow computation), at module
    level or inside a function."""
    offenders = []
    for path in sorted((PACKAGE / "data").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                if "prep" in target.split(".") or target.startswith("tsmtrain.prep"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: from {target}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(REPO)}:{node.lineno}: import {a.name}" for a in node.names
                              if a.name.startswith("tsmtrain.prep")]
    assert not offenders, offenders


def test_importing_the_loader_loads_no_preparation_module():
    """The same, by running it: a fresh interpreter imports the loader and the readers and lists
    the tsmtrain modules it loaded."""
    import subprocess
    import sys

    code = ("import sys, tsmtrain.data.loader, tsmtrain.data.readers\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('tsmtrain'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPO).stdout.split()
    assert "tsmtrain.data.loader" in loaded and "tsmtrain.data.readers.tar" in loaded
    assert not [m for m in loaded if m.startswith(("tsmtrain.prep", "tsmtrain.eval", "tsmtrain.train", "tsmtrain.bench"))]


def test_the_recipe_package_imports_no_data_module():
    """The recipe schema and loader stand on their own (the label map is the recipe's:
    :mod:`tsmtrain.recipe.label_map`)."""
    graph = import_graph()
    assert not [(m, t) for m, ts in graph.items() if m.startswith("tsmtrain.recipe") for t in ts
                if t.startswith("tsmtrain.data")]


INTERNAL_SIGNALS = {"UserError", "VideoDecodeError", "SampleError", "_SourceError", "_Abort"}
"""Exception classes allowed to derive from a built-in exception: the one base of user mistakes,
and the internal signals tsmtrain.errors lists (caught where they are raised, never shown)."""


def _exception_classes():
    import builtins

    builtin = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
               and issubclass(getattr(builtins, n), BaseException)}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                yield path, node, bases & builtin


def test_every_user_mistake_derives_from_the_one_base():
    direct = {node.name: str(path.relative_to(REPO)) for path, node, builtin in _exception_classes() if builtin}
    assert set(direct) <= INTERNAL_SIGNALS, {k: v for k, v in direct.items() if k not in INTERNAL_SIGNALS}
    assert "UserError" in direct


def test_the_cli_catches_the_one_base_not_its_subclasses():
    """Every ``except`` in tsmtrain/cli names UserError (or a built-in such as ValueError from a
    parser), never a subclass of UserError: a new error type needs no new catch."""
    user_types = {node.name for _, node, _ in _exception_classes()} - INTERNAL_SIGNALS
    caught = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node.type)
                         if isinstance(n, (ast.Name, ast.Attribute))}
                caught += [f"{path.name}:{node.lineno} {n}" for n in names & user_types]
    assert not caught, caught


def test_every_module_imports_first_on_its_own():
    """Each module imported as the first tsmtrain module of a process (its packages' ``__init__``
    run on the way): an import cycle shows as "partially initialized module" whatever order the
    rest of the suite imported things in. One process, tsmtrain's modules cleared between tries."""
    import subprocess
    import sys

    names = sorted(n for n in import_graph() if not n.endswith("__main__"))
    code = ("import importlib, sys\nbad = []\n"
            f"for name in {names!r}:\n"
            "    for m in [m for m in sys.modules if m == 'tsmtrain' or m.startswith('tsmtrain.')]:\n"
            "        del sys.modules[m]\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as err:\n        bad.append(f'{name}: {type(err).__name__}: {err}')\n"
            "print('\\n'.join(bad))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", done.stdout
