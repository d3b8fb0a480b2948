"""Figures about tsmtrain's own source, read with ``ast``: lines per package, the ten longest
functions, module-level import cycles, the places that rename a file into place (atomic writers)
and the exception classes whose base is a built-in exception (exception bases).

Usage: ``python scripts/codebase_figures.py [ROOT]`` (ROOT: a checkout, default this one).
Prints plain text; used for the before/after figures of a restructuring.
"""

import ast
import builtins
import sys
from collections import Counter
from pathlib import Path

REPO = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_layering  # noqa: E402  (the import graph and Tarjan's cycles, shared with the test)

test_layering.REPO, test_layering.PACKAGE = REPO, REPO / "tsmtrain"
BUILTIN_EXCEPTIONS = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
                      and issubclass(getattr(builtins, n), BaseException)}


def main() -> None:
    files = sorted((REPO / "tsmtrain").rglob("*.py"))
    lines = Counter()
    functions, renames, bases = [], [], []
    for path in files:
        rel = path.relative_to(REPO)
        text = path.read_text()
        package = rel.parts[1] if len(rel.parts) > 2 else "(top)"
        lines[package] += len(text.splitlines())
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in {"replace", "rename"}:
                target = ast.unparse(node.func.value)
                if target == "os" or (node.func.attr == "replace" and len(node.args) == 1 and not node.keywords
                                      and not isinstance(node.func.value, ast.Constant) and "str" not in target):
                    renames.append(f"{rel}:{node.lineno} {ast.unparse(node)[:70]}")
            elif isinstance(node, ast.ClassDef):
                names = {ast.unparse(b) for b in node.bases}
                if names & BUILTIN_EXCEPTIONS:
                    bases.append(f"{rel}:{node.lineno} {node.name}({', '.join(sorted(names))})")
    print(f"lines in tsmtrain/: {sum(lines.values())}")
    for package, count in sorted(lines.items(), key=lambda kv: -kv[1]):
        print(f"  {package:10s} {count:6d}")
    print("ten longest functions:")
    for length, where in sorted(functions, reverse=True)[:10]:
        print(f"  {length:4d}  {where}")
    found = test_layering.cycles(test_layering.import_graph())
    print(f"module-level import cycles: {len(found)}")
    for members in found:
        print("  " + " <-> ".join(members))
    print(f"calls that rename a file into place (os.replace/os.rename/Path.replace): {len(renames)}")
    for where in renames:
        print("  " + where)
    print(f"exception classes derived directly from a built-in exception: {len(bases)}")
    for where in bases:
        print("  " + where)


if __name__ == "__main__":
    main()
