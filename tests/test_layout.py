"""Project rules that code review would otherwise have to catch (../shared/STYLE.md, docs/architecture.md)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "hnal_ray"

# Stages from the bottom up: a module may import its own stage and the stages strictly below it.
LAYER = {"io": 0, "config": 0, "device": 0,          # shared by every stage
         "data": 1, "score": 1,                       # pure stages
         "retrieval": 2,                              # pure, trains on data's feature tables
         "cluster": 3,                                # everything that imports Ray
         "loop": 4, "bench": 5, "api": 6, "cli": 7, "__init__": 7}


def imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement of a file, including those inside functions."""
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in imports(path):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif node.module and node.level == 0:
            names.add(node.module)
    return names


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def project_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The hnal_ray modules a file imports (`from hnal_ray.x import y` counts as x.y when y is a module)."""
    out = set()
    for node in imports(path):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hnal_ray"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known.keys()
            out |= subs or {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("hnal_ray")}
    return out - {"hnal_ray"}


def test_every_module_belongs_to_a_stage():
    assert sorted({stage(m) for m in package_modules()} - LAYER.keys()) == []


def test_only_the_cluster_package_imports_ray():
    offenders = [m for m, p in package_modules().items()
                 if any(n.split(".")[0] == "ray" for n in imported_modules(p)) and stage(m) != "cluster"]
    assert offenders == []


def test_imports_point_down_the_stages():
    known = package_modules()
    wrong = [f"{m} -> {dep}" for m, p in known.items() for dep in project_imports(p, known)
             if stage(dep) != stage(m) and LAYER[stage(dep)] >= LAYER[stage(m)]]
    assert wrong == []


def test_no_import_cycles():
    known = package_modules()
    graph = {m: project_imports(p, known) & known.keys() for m, p in known.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    files = list(PKG.rglob("*.py")) + list((REPO / "tests").glob("*.py")) + list((REPO / "jobs").glob("*.py"))
    private = [f"{p.relative_to(REPO)}: {node.module}.{a.name}" for p in files for node in imports(p)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hnal_ray")
               for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_the_layout_rules_catch_a_violation(tmp_path):
    """The checks above can fail: an upward import and a cycle in a throwaway package are found."""
    pkg = tmp_path / "hnal_ray"
    (pkg / "score").mkdir(parents=True)
    (pkg / "loop").mkdir()
    (pkg / "score" / "job.py").write_text("from hnal_ray.loop import driver\n")
    (pkg / "loop" / "driver.py").write_text("import hnal_ray.score.job\n")
    known = {module_name(p, tmp_path): p for p in pkg.rglob("*.py")}
    deps = {m: project_imports(p, known) for m, p in known.items()}
    assert deps == {"hnal_ray.score.job": {"hnal_ray.loop.driver"}, "hnal_ray.loop.driver": {"hnal_ray.score.job"}}
    assert LAYER[stage("hnal_ray.loop.driver")] >= LAYER[stage("hnal_ray.score.job")]


def test_the_architecture_page_names_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and f"`{p.name}`" not in text]
    assert missing == []
