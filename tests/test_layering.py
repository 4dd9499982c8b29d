"""The rule of what may import what (docs/architecture.md), checked on every module's imports.

    tools/  ->  virtex_d2 (pipeline, reports, cli)  ->  detectron2_ext  ->  pretrain (library)
                                                                        pretrain.engine (the loop)

- ``pretrain`` knows nothing of detectron2 or of the packages above it;
- only the loop itself (and the tools that run or time it) import ``pretrain.engine``;
- ``detectron2_ext`` uses only the ``pretrain`` modules listed in docs/architecture.md
  (:data:`D2_MAY_IMPORT`, the same list), never the loop, and knows nothing of the pipeline;
- no package imports a script from ``tools/``, as ``tools.x`` or by its bare name.
"""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "detectron2_ext", "virtex_d2")
ENGINE = "pretrain.engine"
ENGINE_USERS = {"tools/pretrain.py", "tools/benchmark.py"}
# What detectron2_ext may import of pretrain (docs/architecture.md's table says the same).
D2_MAY_IMPORT = ("pretrain.errors", "pretrain.config", "pretrain.checkpoint_io", "pretrain.files",
                 "pretrain.data.dataset_root", "pretrain.data.images", "pretrain.models.vit", "pretrain.optim_resume", "pretrain.stop_signals")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (relative ones resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: list[str]) -> set[str]:
    """What :func:`imported_modules` finds in ``source``, a module of ``package``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(REPO)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if any(within(module, banned) for banned in forbidden)
    ]


def test_the_import_walker_sees_relative_and_nested_imports():
    """The checks below are only as good as this walker: it must resolve what they rely on."""
    package = REPO / "pretrain" / "models" / "factory.py"
    assert "pretrain.models.captioning" in imported_modules(package)  # `from .captioning import ...`
    assert "pretrain.engine.setup.build_training" in imported_modules(REPO / "tools" / "benchmark.py")  # in a function


def test_pretrain_knows_nothing_of_detectron2_or_the_packages_above():
    assert violations(sources("pretrain"), ("detectron2", "detectron2_ext", "virtex_d2", "tools")) == []


@pytest.mark.parametrize("folder", ["pretrain", "detectron2_ext", "virtex_d2", "tools"])
def test_only_the_loop_and_its_runners_import_the_engine(folder):
    files = [p for p in sources(folder) if not within(module_name(p), ENGINE)
             and str(p.relative_to(REPO)) not in ENGINE_USERS]
    assert violations(files, (ENGINE,)) == []


def test_detectron2_ext_knows_nothing_of_the_pipeline():
    assert violations(sources("detectron2_ext"), ("virtex_d2", "tools")) == []


def test_the_pipeline_does_not_import_scripts():
    assert violations(sources("virtex_d2"), ("tools",)) == []


def test_detectron2_ext_imports_only_the_listed_pretrain_modules():
    offenders = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources("detectron2_ext")
        for module in sorted(imported_modules(path))
        if within(module, "pretrain") and module != "pretrain" and not any(within(module, ok) for ok in D2_MAY_IMPORT)
    ]
    assert offenders == [], "add the module to D2_MAY_IMPORT and docs/architecture.md, or import something listed"


def test_the_list_is_the_one_docs_architecture_draws():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `detectron2_ext/` |"))
    may_import = row.split("|")[2]
    assert set(re.findall(r"`(pretrain\.[\w.]+)`", may_import)) == set(D2_MAY_IMPORT)


def tool_scripts() -> set[str]:
    """Bare module names of the scripts in tools/; ``pretrain`` is left out: it names the package too."""
    return {path.stem for path in (REPO / "tools").glob("*.py")} - set(PACKAGES)


def bare_script_imports(modules: set[str]) -> list[str]:
    return sorted(module for module in modules if module.split(".")[0] in tool_scripts())


def test_no_package_imports_a_tool_script_by_its_bare_name():
    """tools/ is on sys.path wherever a tool runs (tools/_bootstrap.py), so ``import train_net``
    would work there and nowhere else."""
    offenders = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources(*PACKAGES)
        for module in bare_script_imports(imported_modules(path))
    ]
    assert offenders == []


def test_the_bare_name_check_sees_a_bare_import():
    source = "def main():\n    from train_net import cli\n    import _bootstrap\n    import pretrain.config\n"
    assert bare_script_imports(imports_in(source, ["virtex_d2"])) == ["_bootstrap", "train_net", "train_net.cli"]


def test_packages_find_nothing_by_walking_up_from_their_own_file():
    """A package must work from an installed copy: no repository-root path arithmetic."""
    offenders = [
        str(path.relative_to(REPO))
        for path in sources(*PACKAGES)
        if "__file__" in (text := path.read_text(encoding="utf-8")) and (".parent.parent" in text or "parents[" in text)
    ]
    assert offenders == []
