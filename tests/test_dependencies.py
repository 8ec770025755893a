"""Every third-party module the tests and the reference main app import is declared in pyproject.toml (the
service's dependencies or the `test` extra), so `make test` on a fresh clone installs it."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.conftest import REPO

LOCAL = {"imgsvc", "mainapp", "tests"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {canonical(re.match(r"[A-Za-z0-9_.-]+", requirement)[0]) for requirement in requirements}  # type: ignore[index]


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - LOCAL - set(sys.stdlib_module_names)


def test_every_module_the_tests_import_is_declared() -> None:
    distributions = packages_distributions()
    wanted = declared()
    undeclared = {}
    for path in sorted([*(REPO / "tests").glob("*.py"), *(REPO / "mainapp").rglob("*.py")]):
        for module in imported(path):
            if not {canonical(d) for d in distributions.get(module, [])} & wanted:
                undeclared[module] = path.relative_to(REPO).as_posix()
    assert undeclared == {}, f"declare these in pyproject.toml: {undeclared}"
