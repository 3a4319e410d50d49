"""Code checks that run with the tests (no services, a few seconds): the layers' import contract,
no import cycles, functions that read in one screen, lint and format, strict types on the kernel.

The layers are docs/architecture.md's; the contract lives in pyproject.toml ([tool.importlinter]).
Imports inside functions count everywhere here: a lazy import is fine for a heavy library (torch,
tensorflow, tensorrt), never as a way around a layer or a cycle."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "core", "worker", "cvopt")
MAX_FUNCTION_LINES = 80
LENGTH_CHECKED = ("api", "core", "worker", "cvopt")


def _tool(name: str) -> str | None:
    """A console script of this environment (the dev extra), else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _python_files(*roots: str) -> Iterator[Path]:
    for root in roots:
        yield from sorted((ROOT / root).rglob("*.py"))


# -- layers --------------------------------------------------------------------------------------


def test_import_contracts_hold():
    """core imports neither api nor worker; api no worker; the SDK neither; the CLI no api and
    worker only to start one; passes no api (pyproject.toml's [tool.importlinter] contracts)."""
    lint_imports = _tool("lint-imports")
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = _run([lint_imports, "--no-cache"])
    assert result.returncode == 0, result.stdout + result.stderr


def _worker_imports(tree: ast.AST) -> list[ast.stmt]:
    found: list[ast.stmt] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "worker" for a in node.names):
            found.append(node)
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "worker":
            found.append(node)
    return found


def test_cli_imports_worker_only_in_its_worker_side_commands():
    """The contract lets cvopt.cli import worker.* because import-linter cannot see functions:
    this sees them. Only the commands that run on a worker may: `worker` (starts a Celery worker)
    and `doctor` (runs the worker's runtimes and GPU steps)."""
    path = ROOT / "cvopt" / "cli.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    commands = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and node.name in ("worker", "doctor")
        and any(isinstance(d, ast.Call) and ast.unparse(d.func).endswith(".command") for d in node.decorator_list)
    ]
    assert sorted(c.name for c in commands) == ["doctor", "worker"], "cvopt/cli.py lacks its worker-side commands"
    outside = [
        f"cvopt/cli.py:{node.lineno}: {ast.unparse(node)}"
        for node in _worker_imports(tree)
        if not any(c.lineno <= node.lineno <= (c.end_lineno or c.lineno) for c in commands)
    ]
    assert not outside, "worker imports outside the worker-side commands:\n" + "\n".join(outside)


# -- cycles --------------------------------------------------------------------------------------


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.append(member)
                        if member == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _shortest_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """The shortest import cycle within one component: [a, b, ..., a]."""
    members = set(comp)
    best: list[str] = []
    for start in comp:
        parent: dict[str, str | None] = {start: None}
        queue = deque([start])
        found = None
        while queue and found is None:
            node = queue.popleft()
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    found = node
                    break
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        if found is None:
            continue
        path: list[str] = []
        at: str | None = found
        while at is not None:
            path.append(at)
            at = parent[at]
        cycle = [*reversed(path), start]
        if not best or len(cycle) < len(best):
            best = cycle
    return best


def test_no_import_cycles():
    """No module imports itself through others, counting imports inside functions (grimp's graph,
    the one import-linter checks). Each cycle is printed with the lines that close it."""
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (pip install -e '.[dev]')")
    built = grimp.build_graph(*PACKAGES, cache_dir=None)
    graph = {m: set(built.find_modules_directly_imported_by(m)) & built.modules for m in built.modules}
    report = []
    for comp in _components(graph):
        cycle = _shortest_cycle(graph, comp)
        steps = []
        for importer, imported in zip(cycle, cycle[1:], strict=False):
            lines = sorted({d["line_number"] for d in built.get_import_details(importer=importer, imported=imported)})
            steps.append(f"    {importer} -> {imported} (line {', '.join(map(str, lines))})")
        report.append(f"{len(comp)} modules: {', '.join(comp)}\n  shortest cycle:\n" + "\n".join(steps))
    assert not report, f"{len(report)} import cycle(s):\n" + "\n".join(report)


# -- function length -----------------------------------------------------------------------------


def test_functions_read_in_one_screen():
    """No function in api/, core/ or worker/ is longer than 80 lines (def to last line)."""
    long = []
    for path in _python_files(*LENGTH_CHECKED):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append((lines, f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)"))
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(s for _, s in sorted(long)[::-1])


# -- lint, format, types -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ruff() -> str:
    found = _tool("ruff")
    if found is None:
        pytest.skip("ruff is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return found


def test_ruff_lint(ruff):
    result = _run([ruff, "check", "--no-fix", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format(ruff):
    result = _run([ruff, "format", "--check", "."])
    assert result.returncode == 0, "not ruff-formatted (run `ruff format`):\n" + result.stdout + result.stderr


def test_kernel_types_are_strict():
    """mypy, strict on core/ ([tool.mypy] in pyproject.toml)."""
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the dev extra: pip install -e '.[dev]')")
    result = _run([sys.executable, "-m", "mypy", "core"])
    assert result.returncode == 0, result.stdout + result.stderr
