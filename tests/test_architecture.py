"""The shape of the package: imports point one way, functions fit in a head, and no code in
micl/ exists only for tests. Pure reads of the source (ast), no imports of it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "micl"

# Lower layers never import higher ones (same layer: allowed, as long as there is no cycle).
LAYERS = [
    ["micl.config", "micl.schedule"],
    ["micl.data", "micl.models", "micl.tracking", "micl.console", "micl.plots"],
    ["micl.evaluate", "micl.artifacts"],
    ["micl.objectives"],
    ["micl.train"],
    ["micl.driver"],
    ["micl.tune_space", "micl.tune", "micl.compare", "micl.figures", "micl.finetune"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def micl_imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("micl"):
            found += [(f"{node.module}.{a.name}", node) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name.startswith("micl")]
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _ in micl_imports(ast.parse(path.read_text())):
            while target not in modules and "." in target:  # micl.x.y.Name -> micl.x.y
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                edges[name].add(target)
    return edges


def test_imports_point_down_and_form_no_cycle():
    edges = graph()
    upward = [(a, b) for a, targets in edges.items() for b in targets if layer(b) > layer(a)]
    assert not upward, f"imports that point up: {upward}"
    assert "micl.objectives" in edges["micl.train"]  # the graph sees real imports
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_no_import_of_micl_inside_a_function():
    hidden = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden += [f"{path.relative_to(ROOT)}:{node.lineno}"
                           for _, node in micl_imports(fn)]
    assert not hidden, f"function-local imports of micl (a cycle being dodged?): {hidden}"


def test_functions_fit_in_a_head():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not long, f"functions over 60 lines: {long}"


def test_no_fault_injection_in_the_product():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for word in ("inject_fault", "MICL_ALLOW_FAULT_INJECTION", "fault_marker"):
            assert word not in text, f"{path.relative_to(ROOT)} mentions {word}"


def test_the_training_loop_reads_as_named_steps():
    tree = ast.parse((PACKAGE / "train.py").read_text())
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                and n.name == "train_loop_per_worker")
    assert loop.end_lineno - loop.lineno + 1 <= 25
    called = {n.func.id for n in ast.walk(loop) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Name)}
    assert {"resume", "train_epoch", "close_epoch", "save_and_report"} <= called


def third_party_imports(path: Path) -> set[str]:
    """Top-level packages a module imports at load time (function-local imports excluded)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_models_and_schedule_load_without_ray_or_mlflow():
    """The model, the lr schedule and the IDX reader run where only torch and timm are
    installed (benchmarks/supervised_probe.py on a bare GPU machine), so nothing they import,
    directly or through other micl modules, may need Ray or MLflow."""
    edges, paths = graph(), {module_name(p): p for p in PACKAGE.rglob("*.py")}
    roots = ["micl.models.classifier", "micl.models.export", "micl.schedule", "micl.data.idx"]
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += edges[module] | {m for m in ("micl", "micl.data", "micl.models")
                                     if module.startswith(m + ".")}
    heavy = {m: third_party_imports(paths[m]) & {"ray", "mlflow"} for m in seen}
    assert not {m: h for m, h in heavy.items() if h}, heavy
