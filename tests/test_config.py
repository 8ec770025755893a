"""Settings: every variable parsed, validated, reported at once, shown by `imgsvc config --check`, documented."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from imgsvc.config import GROUPS, ConfigError, Settings, env_name
from tests.conftest import REPO


def test_defaults_match_the_design() -> None:
    settings = Settings.from_env({})
    assert (settings.host, settings.port, settings.auth) == ("127.0.0.1", 8080, "none")
    assert settings.data_dir == Path("./imgsvc-data")
    assert settings.database_url is None
    assert settings.effective_storage_url == f"file://{Path('imgsvc-data/blobs').resolve()}"
    assert settings.cache_bytes == 256 * 1024 * 1024
    assert settings.max_upload_bytes == 25_000_000 and settings.max_pixels == 50_000_000
    assert settings.unsigned_widths is not None and settings.unsigned_widths[0] == 16
    assert settings.unsigned_widths[-1] == 3840
    assert settings.effective_public_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("IMGSVC_PORT", "9000", "port", 9000),
        ("IMGSVC_HOST", "::1", "host", "::1"),
        ("IMGSVC_DATA_DIR", "/srv/imgsvc", "data_dir", Path("/srv/imgsvc")),
        ("IMGSVC_DATABASE_URL", "postgresql://u:p@db/imgsvc", "database_url", "postgresql://u:p@db/imgsvc"),
        ("IMGSVC_STORAGE_URL", "file:///srv/blobs", "storage_url", "file:///srv/blobs"),
        ("IMGSVC_PUBLIC_URL", "https://img.example.com/", "public_url", "https://img.example.com"),
        ("IMGSVC_UNSIGNED_WIDTHS", "640, 128,128", "unsigned_widths", (128, 640)),
        ("IMGSVC_UNSIGNED_WIDTHS", "*", "unsigned_widths", None),
        ("IMGSVC_WORKERS", "3", "workers", 3),
        ("IMGSVC_RENDER_QUEUE", "0", "render_queue", 0),
        ("IMGSVC_RENDER_TIMEOUT", "2.5", "render_timeout", 2.5),
        ("IMGSVC_CACHE_BYTES", "0", "cache_bytes", 0),
        ("IMGSVC_ORIGINALS_CACHE_BYTES", "1_000_000", "originals_cache_bytes", 1_000_000),
        ("IMGSVC_MAX_UPLOAD_BYTES", "1000", "max_upload_bytes", 1000),
        ("IMGSVC_MAX_PIXELS", "1000000", "max_pixels", 1_000_000),
        ("IMGSVC_MAX_FRAMES", "1", "max_frames", 1),
        ("IMGSVC_MAX_OUTPUT_DIM", "4096", "max_output_dim", 4096),
        (
            "IMGSVC_PRESETS",
            "avatar:w=96&h=96&fit=cover",
            "presets",
            {"avatar": (("w", "96"), ("h", "96"), ("fit", "cover"))},
        ),
        (
            "IMGSVC_PRESETS",
            "medium:w=300;hero:w=1600",
            "presets",
            {"medium": (("w", "300"),), "hero": (("w", "1600"),)},
        ),
        ("IMGSVC_AUTH_ALGORITHMS", "ES256, EdDSA,ES256", "auth_algorithms", ("ES256", "EdDSA")),
        ("IMGSVC_LOG_LEVEL", "DEBUG", "log_level", "debug"),
        ("IMGSVC_AUTH", "none", "auth", "none"),
    ],
)
def test_every_variable_is_read(variable: str, value: str, field: str, expected: object) -> None:
    assert getattr(Settings.from_env({variable: value}), field) == expected


def readme_groups() -> dict[str, str]:
    """Variable -> the sub-heading of README's configuration table it is listed under (lowercased)."""
    section = (REPO / "README.md").read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, str] = {}
    for heading, body in re.findall(r"^### (\w+)\n(.*?)(?=^### |\Z)", section, re.M | re.S):
        for variable in re.findall(r"^\| `(IMGSVC_\w+)` \|", body, re.M):
            assert variable not in found, f"{variable} is listed twice in README.md"
            found[variable] = heading.lower()
    return found


def test_every_setting_is_in_its_group_in_the_readme_table() -> None:
    documented = readme_groups()
    for f in fields(Settings):
        assert f.metadata["help"] and f.metadata["group"] in GROUPS
        assert documented.get(env_name(f.name)) == f.metadata["group"], f"{env_name(f.name)} in README.md"
    assert set(documented) == {env_name(f.name) for f in fields(Settings)}


def test_config_check_lists_every_setting_in_its_group() -> None:
    result = run_cli("config", "--check", env={})
    assert result.returncode == 0, result.stderr
    headings = re.findall(r"^\[(\w+)\]$", result.stdout, re.M)
    assert headings == list(GROUPS)
    shown = {}
    for heading, body in re.findall(r"^\[(\w+)\]\n(.*?)(?=^\[|\Z)", result.stdout, re.M | re.S):
        shown.update(dict.fromkeys(re.findall(r"^(IMGSVC_\w+) ", body, re.M), heading))
    assert shown == {env_name(f.name): f.metadata["group"] for f in fields(Settings)}
    assert "IMGSVC_PRESETS" in result.stdout and "medium:w=256;" in result.stdout


def test_all_errors_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(
            {
                "IMGSVC_PORT": "99999",
                "IMGSVC_WORKERS": "lots",
                "IMGSVC_STORAGE_URL": "ftp://x",
                "IMGSVC_AUTH": "magic",
                "IMGSVC_TYPO": "1",
                "IMGSVC_PRESETS": "hero:w=abc",
                "IMGSVC_AUTH_ALGORITHMS": "RS256,HS256",
            }
        )
    names = sorted(problem.split(":")[0] for problem in caught.value.problems)
    assert names == [
        "IMGSVC_AUTH", "IMGSVC_AUTH_ALGORITHMS", "IMGSVC_PORT", "IMGSVC_PRESETS", "IMGSVC_STORAGE_URL",
        "IMGSVC_TYPO", "IMGSVC_WORKERS",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"IMGSVC_MAX_OUTPUT_DIM": "4096", "IMGSVC_PRESETS": "big:w=5000"}, "preset 'big': w must be"),
        ({"IMGSVC_MAX_OUTPUT_DIM": "600", "IMGSVC_PRESETS": "big:w=300&dpr=2.5"}, "preset 'big': 300 × dpr 2.5 = 750"),
        ({"IMGSVC_MAX_OUTPUT_DIM": "512"}, "preset 'full': w must be a width in pixels: a decimal integer 1..512"),
    ],
)
def test_presets_must_fit_the_output_limit(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.problems[0].startswith(f"IMGSVC_PRESETS: {problem}")
    assert caught.value.problems[0].endswith("(IMGSVC_MAX_OUTPUT_DIM)")
    fitting = Settings.from_env({**env, "IMGSVC_PRESETS": "big:w=300&dpr=2", "IMGSVC_MAX_OUTPUT_DIM": "600"})
    assert fitting.presets == {"big": (("w", "300"), ("dpr", "2"))}


def test_auth_none_is_refused_on_a_public_bind() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        Settings.from_env({"IMGSVC_HOST": "0.0.0.0"})
    assert Settings.from_env({"IMGSVC_HOST": "localhost"}).host == "localhost"


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgsvc", *args], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
        timeout=60, cwd=REPO,
    )  # fmt: skip


def test_config_check_prints_settings_with_secrets_masked() -> None:
    result = run_cli("config", "--check", env={"IMGSVC_DATABASE_URL": "postgresql://u:hunter2@db/x"})
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert re.search(r"IMGSVC_DATABASE_URL +postgresql://u:\*\*\*\*@db/x\n", result.stdout)
    assert "IMGSVC_PORT" in result.stdout and "# Bind port" in result.stdout


def test_config_check_fails_with_every_problem() -> None:
    env = {"IMGSVC_PORT": "0", "IMGSVC_PRESETS": "bad name:w=1", "IMGSVC_AUTH_ALGORITHMS": "none"}
    result = run_cli("config", "--check", env=env)
    assert result.returncode == 2 and result.stdout == ""
    problems = result.stderr.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in problems] == [
        "IMGSVC_PORT",
        "IMGSVC_AUTH_ALGORITHMS",
        "IMGSVC_PRESETS",
    ]
    assert "malformed preset 'bad name:w=1'" in result.stderr and "'none' is not one of" in result.stderr
    for command in (("sign", "ID", "p=medium"), ("serve",)):  # the same check before anything else runs
        assert run_cli(*command, env={**env, "IMGSVC_SIGNING_KEYS": f"k1:{'x' * 32}"}).stderr == result.stderr


def test_migrate_is_idempotent(database_url: str) -> None:
    env = {"IMGSVC_DATABASE_URL": database_url, "IMGSVC_STORAGE_URL": "file:///tmp/imgsvc-migrate-test"}
    for _ in range(2):
        result = run_cli("migrate", env=env)
        assert result.returncode == 0, result.stderr
        latest = max(p.stem for p in (REPO / "imgsvc" / "migrations").glob("*.sql"))
        assert f"database at schema {latest}" in result.stdout
