"""Project rules that code review would otherwise have to catch (../shared/STYLE.md)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hnal_ray"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_cluster_package_imports_ray():
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if "ray" in imported_modules(p) and p.relative_to(PKG).parts[0] != "cluster"]
    assert offenders == []


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
