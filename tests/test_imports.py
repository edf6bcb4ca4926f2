"""The package's structure as docs/architecture.md draws it, checked against the code's imports
(every `import` / `from ... import` of a megatron_rpg module at any depth of a file: lazy imports
inside functions and TYPE_CHECKING ones included):

- no import cycles (a cycle is how a section's config and the library it configures ended up
  importing each other, issue 18);
- every part (a folder or a top-level module) is in one layer of the doc, and every import
  between parts points down the layers;
- the doc's generated pictures are those of today's imports (tools/draw_architecture.py);
- the boundaries of issue 34: nothing under step/ or rollout/ imports RunConfig; nothing outside
  rollout/ builds an engine, feeds it weights or reaches into one; 'auto' is resolved in one
  rollout module.
"""

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("draw", ROOT / "tools" / "draw_architecture.py")
draw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(draw)
PACKAGE = draw.PACKAGE


def sources(under: str = "") -> dict[Path, ast.AST]:
    return {p: ast.parse(p.read_text()) for p in sorted((PACKAGE / under).rglob("*.py"))}


def test_the_package_has_no_import_cycles():
    graph = draw.module_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_every_import_between_parts_points_down_the_layers():
    layers = draw.read_layers(draw.DOC.read_text())
    layer_of = {part: i for i, layer in enumerate(layers) for part in layer}
    graph = draw.module_graph()
    parts = {draw.part_of(m) for m in graph} - {""}
    assert parts == set(layer_of), "parts missing from the doc's layers, or no longer there"
    upward = [
        f"{module} -> {target} (layers {layer_of[draw.part_of(module)] + 1} -> "
        f"{layer_of[draw.part_of(target)] + 1})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if draw.part_of(module)
        and draw.part_of(target)
        and draw.part_of(module) != draw.part_of(target)
        and layer_of[draw.part_of(target)] <= layer_of[draw.part_of(module)]
    ]
    assert not upward, "\n".join(upward)


def test_the_architecture_pictures_are_drawn_from_todays_imports():
    text = draw.DOC.read_text()
    assert draw.with_generated(text) == text, "run: python tools/draw_architecture.py"


def test_step_and_rollout_take_config_sections_not_the_run_config():
    offenders = [
        str(path.relative_to(ROOT))
        for under in ("step", "rollout")
        for path, tree in sources(under).items()
        for node in ast.walk(tree)
        if (isinstance(node, ast.ImportFrom) and any(a.name == "RunConfig" for a in node.names))
        or (isinstance(node, ast.Name) and node.id == "RunConfig")
    ]
    assert not offenders, offenders


ENGINE_INTERNALS = {
    "EmbeddedEngine",
    "VLLMEngine",
    "VLLMServerEngine",
    "build_engine",
    "sync_weights",
    "collective_generate",
}


def test_nothing_outside_rollout_touches_an_engine():
    """Outside rollout/ an engine is neither built nor fed weights (the names above are not
    imported) nor reached into: `x.engine` is only ever the config's rollout.engine (a string)
    or an argument of the CLI."""
    offenders = []
    for path, tree in sources().items():
        if path.is_relative_to(PACKAGE / "rollout"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "megatron_rpg.rollout"
            ):
                offenders += [
                    f"{path.name}: imports {a.name}"
                    for a in node.names
                    if a.name in ENGINE_INTERNALS
                ]
            if isinstance(node, ast.Attribute) and node.attr in ("engine", "_engine"):
                owner = ast.unparse(node.value)
                if not (owner.endswith("rollout") or owner == "args"):
                    offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_auto_is_resolved_in_one_rollout_module():
    resolving = {
        path.name
        for path, tree in sources("rollout").items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(isinstance(c, ast.Constant) and c.value == "auto" for c in node.comparators)
    }
    assert resolving == {"placement.py"}
