"""The layout rule: imports only point down the flow (spec -> render -> cache -> storage -> pipeline ->
headers), and `app.py` is the one place that builds everything."""

from __future__ import annotations

import ast

from tests.conftest import REPO

LAYERS = [
    {"errors", "metrics", "logs"},
    {"spec"},
    {"client_hints"},
    {"config_values"},  # parsers of IMGSVC_* values; presets with spec's rules
    {"config"},
    {"structure", "isolation"},
    {"nginx_deny"},  # nginx nodes' deny-lists, one kind of purge target
    {
        "signing",
        "headers",
        "cache",
        "workers",
        "ratelimit",
        "embedded",
        "migrations",
        "geometry",
        "purge",
        "thumbhash",
        "views",
    },
    {"sniffing", "vips_hardening", "deadline", "encoding"},
    {"finishing"},  # per-frame crop, blur, pad after the resize
    {"storage", "catalog", "idempotency", "pipeline", "client", "openapi", "derivations"},
    {"pyramid"},  # levels and placeholders: pipeline + the derivation queue's records
    {"auth", "upload", "gc", "records", "derive", "settle"},
    {"hits"},
    {"verifiers", "render", "invalidation", "importer", "viewlog"},
    {"services"},
    {"endpoints", "middleware", "cors", "console"},
    {"app"},
    {"server"},
    {"cli"},
    {"__main__"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path) -> str:  # type: ignore[no-untyped-def]
    parts = path.relative_to(REPO / "imgsvc").with_suffix("").parts
    return parts[0]


def imported_modules(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imgsvc"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("imgsvc."))
    return found


def test_every_module_has_a_layer_and_imports_only_downwards() -> None:
    for path in sorted((REPO / "imgsvc").rglob("*.py")):
        if path.name == "__init__.py" and path.parent == REPO / "imgsvc":
            continue
        name = module_name(path)
        assert name in LEVEL, f"{name} has no layer in tests/test_layering.py"
        for target in imported_modules(ast.parse(path.read_text())) - {name}:
            assert LEVEL[target] < LEVEL[name], f"{path.relative_to(REPO)} imports {target}, which is not below it"


def test_every_module_opens_with_a_short_docstring() -> None:
    for path in sorted((REPO / "imgsvc").rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, f"{path.relative_to(REPO)} has no module docstring"
        assert len(docstring.splitlines()) <= 4, f"{path.relative_to(REPO)}: docstring longer than 3 lines"
