"""The package's import structure: no cycles, and arrows only point down (docs/architecture.md).

Every ``import`` in ``fdistill/``, at module level or inside a function, counts as an arrow between modules.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fdistill"

# (importer prefix, imported prefix): arrows that must not exist
FORBIDDEN = [
    ("fdistill.training", "fdistill.tasks"), ("fdistill.training", "fdistill.evaluation"),
    ("fdistill.training", "fdistill.metrics"), ("fdistill.training", "fdistill.data"),
    ("fdistill.training", "fdistill.run"), ("fdistill.training", "fdistill.pipelines"),
    ("fdistill.objectives", "fdistill.training"), ("fdistill.objectives", "fdistill.tasks"),
    ("fdistill.objectives", "fdistill.run"), ("fdistill.objectives", "fdistill.pipelines"),
    ("fdistill.objectives", "fdistill.evaluation"),
    ("fdistill.data", "fdistill.objectives"), ("fdistill.data", "fdistill.training"),
    ("fdistill.data", "fdistill.tasks"), ("fdistill.data", "fdistill.metrics"),
    ("fdistill.data", "fdistill.networks"), ("fdistill.data", "fdistill.pipelines"),
    ("fdistill.data", "fdistill.samplers"), ("fdistill.data", "fdistill.evaluation"),
    ("fdistill.metrics", "fdistill.objectives"), ("fdistill.metrics", "fdistill.data"),
    ("fdistill.metrics", "fdistill.training"), ("fdistill.metrics", "fdistill.tasks"),
    ("fdistill.metrics", "fdistill.networks"), ("fdistill.metrics", "fdistill.pipelines"),
    ("fdistill.pipelines", "fdistill.run"), ("fdistill.pipelines", "fdistill.tasks"),
    ("fdistill.pipelines", "fdistill.objectives"), ("fdistill.pipelines", "fdistill.training"),
    ("fdistill.pipelines", "fdistill.evaluation"),
    ("fdistill.tasks", "fdistill.run"), ("fdistill.tasks", "fdistill.training"),
    ("fdistill.networks", "fdistill.objectives"), ("fdistill.networks", "fdistill.pipelines"),
    ("fdistill.networks", "fdistill.tasks"), ("fdistill.networks", "fdistill.training"),
    ("fdistill.samplers", "fdistill.networks"), ("fdistill.samplers", "fdistill.pipelines"),
    ("fdistill.samplers", "fdistill.objectives"),
    ("fdistill.schedules", "fdistill.networks"),
    ("fdistill.config", "fdistill.objectives"), ("fdistill.config", "fdistill.networks"),
    ("fdistill.config", "fdistill.pipelines"), ("fdistill.config", "fdistill.tasks"),
    ("fdistill.config", "fdistill.training"), ("fdistill.config", "fdistill.data"),
    ("fdistill.config", "fdistill.recipes"),
    ("fdistill.evaluation", "fdistill.tasks"), ("fdistill.evaluation", "fdistill.run"),
    ("fdistill.evaluation", "fdistill.training"), ("fdistill.evaluation", "fdistill.objectives"),
    ("fdistill.containers", "fdistill."), ("fdistill.errors", "fdistill."),
    ("fdistill.preflight", "fdistill.run"), ("fdistill.preflight", "fdistill.training"),
    ("fdistill.tasks", "fdistill.preflight"), ("fdistill.training", "fdistill.preflight"),
    ("fdistill.objectives", "fdistill.preflight"), ("fdistill.networks", "fdistill.preflight"),
    ("fdistill.pipelines", "fdistill.preflight"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of fdistill it imports``; ``from fdistill.x import y`` counts ``fdistill.x.y`` when
    that is a module, else ``fdistill.x``."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_known_arrows():
    graph = import_graph()
    assert "fdistill.containers" in graph["fdistill.training.trainer"]
    assert "fdistill.objectives.common" in graph["fdistill.objectives.dmd"]  # "from fdistill.objectives import common"
    assert "fdistill.tasks" in graph["fdistill.run"]
    assert "fdistill.errors" in graph["fdistill.config"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_arrows_point_down():
    bad = [f"{src} -> {dst}" for src, targets in import_graph().items() for dst in sorted(targets)
           for low, high in FORBIDDEN if (src + ".").startswith(low + ".") or src == low
           if dst == high or dst.startswith(high if high.endswith(".") else high + ".")]
    assert not bad, "\n".join(bad)


def test_only_the_task_factory_asks_the_teachers_type():
    """Teacher kinds are told apart in one place (``fdistill/tasks/__init__.py``); the exporter checks the student
    it is given, which is not the teacher."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                types = ast.unparse(node.args[1])
                if "Denoiser" in types and module_name(path) not in ("fdistill.tasks", "fdistill.pipelines.export"):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} isinstance(..., {types})")
    assert not offenders, "\n".join(offenders)


def test_only_the_specs_name_pipeline_classes():
    """A stock diffusers pipeline class is named in one place, its spec (``fdistill/pipelines/specs.py``); loading,
    export and ``sample.py`` read the spec instead of comparing class names."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) == "fdistill.pipelines.specs":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"[A-Z]\w*Pipeline", node.value):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert not offenders, "\n".join(offenders)
