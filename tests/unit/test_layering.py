"""Layering: the modules of server/ and kernels/ import each other without circles (issue 22), so each
package reads as floors, every module standing above what it imports; and so does every folder seen
as one piece beside its neighbours (server/models/ never imports server/engine/, which imports it).

The graph is read from the source with `ast`, nothing is imported. Relative imports are resolved
against the importing module's package, and the installed names (sloth_serve, sloth_kernels) against
the folders. Every import statement counts: those at module level, those under `if TYPE_CHECKING:`
(a type a module names is still a dependency of its design), and those inside functions, because a
function-local import only defers a dependency, it does not remove it: a circle hidden that way is
still a circle. Only imports from other distributions are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"sloth_serve": ROOT / "server", "sloth_kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages (a package is its __init__)."""
    modules = {}
    for name, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the two packages that module's import statements name, relative ones resolved.
    `from X import y` imports X.y where y is a submodule, else X; a dotted name that is no module
    stands for its longest prefix that is one (`import a.b.c` imports a.b.c; `a.b.f` means a.b)."""
    package = module.split(".") if is_package(path) else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                names.add(submodule if submodule in modules else origin)
    targets = set()
    for name in names:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts and ".".join(parts) != module:
            targets.add(".".join(parts))
    return targets


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the two packages it imports. A package's __init__ runs before any
    module beneath it, but that is no import of the module's own: it is drawn only where named."""
    modules = module_files()
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def folder_graph(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """The modules and subpackages directly in `package`, each standing for everything beneath it:
    A -> B where a module under A imports one under B."""
    depth = package.count(".") + 1

    def child(module: str) -> str | None:
        if not module.startswith(package + "."):
            return None
        return ".".join(module.split(".")[: depth + 1])

    folded: dict[str, set[str]] = {}
    for module, targets in graph.items():
        a = child(module)
        if a is None:
            continue
        folded.setdefault(a, set())
        for target in targets:
            b = child(target)
            if b is not None and b != a:
                folded[a].add(b)
    return folded


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    arrows = [f"  {a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return f"circle of {len(component)}:\n" + "\n".join(arrows)


def test_graph_resolves_relative_and_installed_names() -> None:
    # A guard that the reader sees the imports at all: the engine names its scheduler, the models
    # their kernels (through the installed name).
    graph = import_graph()
    assert "sloth_serve.engine.scheduler" in graph["sloth_serve.engine.llm_engine"]
    assert any(target.startswith("sloth_kernels.") for target in graph["sloth_serve.models.llama"])
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_server_and_kernels_have_no_import_circles() -> None:
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles (move the shared names down a floor):\n" + "\n".join(
        describe(component, graph) for component in found)


def test_every_folder_stands_on_floors_of_its_own() -> None:
    graph = import_graph()
    packages = [module for module, path in module_files().items() if is_package(path)]
    found = {package: circles(folder_graph(graph, package)) for package in packages}
    assert not any(found.values()), "folders that import each other (a shared name belongs a floor lower):\n" + \
        "\n".join(f"in {package}: " + describe(component, folder_graph(graph, package))
                  for package, components in found.items() for component in components)

