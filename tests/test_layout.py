"""The package layout: imports run one way (no cycles, no import from a higher layer), and the public API
in docs/api.md matches `transformers_red.__all__`."""

import ast
import pathlib
import re

import transformers_red

PACKAGE = pathlib.Path(transformers_red.__file__).parent
# Lower layers never import higher ones; modules of one layer may import each other (without cycles).
LAYERS = [
    {"constants", "data", "plots", "records"},
    {"adapter"},
    {"resources", "loading"},
    {"evaluation", "hub", "card"},
    {"training"},
    {"demo"},
    {"commands"},
]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["transformers_red", *parts])


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_modules(path: pathlib.Path, modules: set[str]) -> set[str]:
    """Package modules that `path` imports at run time (top-level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    skip = {id(n) for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.If) and
            _is_type_checking(node) for n in ast.walk(node)}
    for node in ast.walk(ast.parse(path.read_text())):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` may name a submodule
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    graph.pop("transformers_red")  # the public facade imports everything and nothing imports it
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_imports_run_from_higher_layers_to_lower_ones():
    graph = import_graph()
    graph.pop("transformers_red")
    wrong = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)]
    assert not wrong, "imports from a lower to a higher layer: " + ", ".join(sorted(wrong))
    assert "transformers_red" not in {b for targets in graph.values() for b in targets}


def test_every_public_name_is_documented_in_api_md():
    api = (PACKAGE.parents[1] / "docs" / "api.md").read_text()
    documented = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", api))
    missing = sorted(set(transformers_red.__all__) - documented)
    assert not missing, f"exported but not in docs/api.md: {missing}"
    for name in transformers_red.__all__:
        assert getattr(transformers_red, name) is not None
