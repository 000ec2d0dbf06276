"""The package's shape: the module graph has no cycles, every import reaches only its own or an earlier layer,
and serving never pulls in torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import saikyo

ROOT = Path(saikyo.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """saikyo module -> the saikyo modules it imports, anywhere in its body (deferred imports count too)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import mod` names a module when pkg.mod is one; else it names an attribute of pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_module_graph_is_acyclic() -> None:
    graph = import_graph()
    assert len(graph) > 40 and "saikyo.server.app" in graph["saikyo.server"]  # the walk sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_serving_and_the_cli_never_import_torch() -> None:
    code = (
        "import sys, saikyo.server, saikyo.cli, saikyo.runtime.onnxruntime, saikyo.models.repository; "
        "from saikyo.server import create_app; create_app(); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'torchvision'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# The layers, first to last: a module imports only from its own layer and those before it
# (docs/architecture.md). The CLI modules sit on top of everything they drive.
LAYERS = ("settings", "inference", "models", "runtime", "server", "scale", "bench", "cli")
CLI_MODULES = {"saikyo.cli", "saikyo.bench.cli", "saikyo.__main__"}


def layer_of(module: str) -> str | None:
    if module in CLI_MODULES:
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that reaches a later layer, as 'a (layer) -> b (layer)'."""
    found = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here and there and LAYERS.index(there) > LAYERS.index(here):
                found.append(f"{module} ({here}) -> {target} ({there})")
    return found


def test_every_module_sits_in_a_layer() -> None:
    strays = [m for m in import_graph() if m != "saikyo" and layer_of(m) is None]
    assert strays == [], f"modules outside the layers of docs/architecture.md: {strays}"


def test_imports_only_reach_earlier_layers() -> None:
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = {"saikyo.settings": {"saikyo.models.zoo"}, "saikyo.models.zoo": set(), "saikyo.cli": {"saikyo.server.app"}}
    assert upward_imports(graph) == ["saikyo.settings (settings) -> saikyo.models.zoo (models)"]
