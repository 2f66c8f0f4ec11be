"""The package's layers: each module imports only from its own layer or the ones below, and no
import circle exists (at module level or inside functions), so the folders tell the architecture."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "visinspect"
# Lowest first: a module may import from its own layer and the ones before it (README, "The library").
LAYERS = (
    ("visinspect.errors", "visinspect.utils", "visinspect.distributed"),
    ("visinspect.data",),
    ("visinspect.backbones", "visinspect.boxes", "visinspect.metrics", "visinspect.checkpoint"),
    ("visinspect.scoring", "visinspect.evaluate", "visinspect.calibration", "visinspect.training"),
    ("visinspect.methods",),
    ("visinspect.viz", "visinspect.predict"),
    ("visinspect.experiments",),
    ("visinspect.cli", "visinspect.__main__", "visinspect"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((p for group in LAYERS for p in group if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, group in enumerate(LAYERS) if best in group)


def imports(path: Path) -> set[str]:
    """The visinspect modules a file imports at run time (annotations-only imports left out)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("visinspect"):
            for alias in node.names:  # `from visinspect.x import y`: y may be a module
                if node.module == "visinspect" and alias.name == "__version__":
                    continue  # a constant of the root, not its public API
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("visinspect")}
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_stay_in_their_layer_or_below(module):
    above = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert not above, f"{module} (layer {layer(module)}) imports {above} from a higher layer"


def test_no_import_circle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(GRAPH.get(module, ())):
            if state.get(dep) == "open":
                pytest.fail("import circle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
