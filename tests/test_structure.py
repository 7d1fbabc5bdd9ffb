"""The package's shape: modules import downward only (no cycle, lazy imports included), no long
functions in recycore/, no environment reads under kernels/, a public API at the package root, and
the README's kernel example runs."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Module name -> file, for recycore/ and kernels/ (installed as recycore.kernels)."""
    modules = {}
    for folder, package in ((ROOT / "recycore", "recycore"), (ROOT / "kernels", "recycore.kernels")):
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (function-level imports too)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycle():
    modules = _modules()
    # the package root only re-exports names lazily (PEP 562), so it is not a layer of its own
    graph = {name: _imports(path, name, set(modules)) - {"recycore"} for name, path in modules.items()}
    assert graph["recycore.training"] and graph["recycore.cli"]  # the walk sees real imports
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_function_longer_than_80_lines():
    long = []
    for path in sorted((ROOT / "recycore").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_no_environment_reads_under_kernels():
    hits = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                hits.append(f"{path.name}:{node.lineno}")
    assert not hits, hits


def test_benchmarks_do_not_patch_kernel_modules():
    """Configurations are arguments: no benchmark switches a kernel's behaviour by assigning to its
    module's globals (an assignment `name.attr = ...` where name is a recycore.kernels module)."""
    hits = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recycore.kernels"):
                modules |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                modules |= {alias.asname for alias in node.names if alias.name.startswith("recycore.kernels") and alias.asname}
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                    "recycore.kernels" in ast.unparse(node.value):
                modules |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for element in (target.elts if isinstance(target, ast.Tuple) else [target]):
                        if isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name) and \
                                element.value.id in modules:
                            hits.append(f"{path.name}:{node.lineno} {ast.unparse(element)}")
    assert not hits, hits


def test_public_api_at_the_package_root(tmp_path):
    # run outside the checkout, as a user's script: in its root ./recycore (without kernels/) would come
    # first on sys.path, which only an editable install's finder bridges
    result = subprocess.run([sys.executable, "-c", "from recycore import Config, GPT, train, load_artifact, "
                             "load_int5_model; import recycore.kernels; print(GPT.__name__, train.__name__)"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["GPT", "train"]


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under '## {heading}'"
    return match.group(1)


def test_readme_kernel_example_runs(tmp_path):
    """The README's "Use the kernels in your own model" example, as a user would run it (on the CPU
    the kernels run under the Triton interpreter, on a GPU compiled)."""
    script = tmp_path / "example.py"
    script.write_text(_readme_block("Use the kernels in your own model"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout
