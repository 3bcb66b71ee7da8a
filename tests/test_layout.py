"""Project rules that code review would otherwise have to catch (../shared/STYLE.md, docs/architecture.md)."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "hnal_ray"

def drawn_arrows(text: str) -> dict[str, set[str]]:
    """The stage arrows docs/architecture.md draws, from its ```arrows block: {stage: stages it imports}."""
    block = re.search(r"```arrows\n(.*?)```", text, re.S).group(1)
    arrows = {}
    for line in block.strip().splitlines():
        src, _, dst = line.partition("->")
        arrows.setdefault(src.strip(), set()).update(d.strip() for d in dst.split(","))
    return arrows


def reachable(arrows: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each stage's stages below it: the arrows followed transitively, plus the shared modules."""
    out = {}
    for start in set(arrows) | {d for ds in arrows.values() for d in ds}:
        seen, todo = set(), [start]
        while todo:
            for d in arrows.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d), todo.append(d)
        out[start] = (seen | arrows.get("*", set())) - {start, "*"}
    out["__init__"] = set(out) - {"__init__", "*"}  # the package's lazy re-exports
    return out


ARROWS = drawn_arrows((REPO / "docs" / "architecture.md").read_text())
BELOW = reachable(ARROWS)


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


def stage_imports() -> set[tuple[str, str]]:
    known = package_modules()
    return {(stage(m), stage(dep)) for m, p in known.items() for dep in project_imports(p, known)
            if stage(dep) != stage(m)}


def test_every_module_belongs_to_a_drawn_stage():
    assert sorted({stage(m) for m in package_modules()} - BELOW.keys()) == []


def test_only_the_cluster_package_imports_ray():
    offenders = [m for m, p in package_modules().items()
                 if any(n.split(".")[0] == "ray" for n in imported_modules(p)) and stage(m) != "cluster"]
    assert offenders == []


def test_imports_follow_the_drawn_arrows():
    known = package_modules()
    wrong = [f"{m} -> {dep}" for m, p in known.items() for dep in project_imports(p, known)
             if stage(dep) != stage(m) and stage(dep) not in BELOW[stage(m)]]
    assert wrong == []


def test_every_drawn_arrow_is_an_import():
    """No stale arrow: each one drawn between two stages is an import some module makes."""
    used = stage_imports()
    stale = [f"{src} -> {dst}" for src, dsts in ARROWS.items() if src != "*" for dst in dsts
             if (src, dst) not in used]
    assert stale == []


def test_the_drawn_stages_have_no_cycle_and_siblings_stay_apart():
    assert all(s not in BELOW[s] for s in BELOW)
    assert "data" not in BELOW["score"] and "score" not in BELOW["data"]


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
    assert stage("hnal_ray.loop.driver") not in BELOW[stage("hnal_ray.score.job")]
    arrows = drawn_arrows("```arrows\na -> b\nb -> c, d\n* -> io\n```")
    assert reachable(arrows)["a"] == {"b", "c", "d", "io"} and reachable(arrows)["c"] == {"io"}


def test_the_architecture_page_names_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and f"`{p.name}`" not in text]
    assert missing == []
