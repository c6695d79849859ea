"""The codebase's shape: no import cycles in `engine`, the model free of parallelism, short modules, no module named
after a standard-library module, and no citation of notes outside the repository."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every `engine...` module `path` imports, at any depth (function-level imports count too)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            deps.add(node.module)
            deps.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
    return {d for d in deps if d in known}


def test_no_import_cycles_and_the_model_imports_no_parallelism():
    mods = _modules("engine")
    graph = {name: _imports(path, mods) - {name} for name, path in mods.items()}
    for name, deps in graph.items():
        if name.startswith("engine.model"):
            assert not {d for d in deps if d.startswith("engine.parallel")}, name
        assert "engine.train" not in deps, f"{name} imports engine.train (nothing may)"
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep in ("engine", "engine.parallel", "engine.model") and node.startswith(dep):
                continue  # a module importing its own (lazy) package's namespace
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(stack[stack.index(dep):] + [dep])}"
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_module_sizes_and_names():
    for name, path in _modules("engine").items():
        lines = len(path.read_text().splitlines())
        assert lines <= 600, f"{name}: {lines} lines"
        assert name.rsplit(".", 1)[-1] not in sys.stdlib_module_names, f"{name} shadows a standard-library module"
    assert len((ROOT / "engine" / "train.py").read_text().splitlines()) <= 300


def test_no_citations_outside_the_repository():
    needles = ("DESIGN" + ".md", "refer" + "ence/", "ENV" + "-NOTES")
    for package in ("engine", "kernels", "tests", "docs", "benchmarks", "examples"):
        for path in (ROOT / package).rglob("*"):
            if path.suffix in (".py", ".md", ".toml", ".sh", ".cpp") and path.is_file():
                text = path.read_text()
                for needle in needles:
                    assert needle not in text, f"{path.relative_to(ROOT)} cites {needle}"
