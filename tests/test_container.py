"""What can be checked of the container here (no Docker engine): the Dockerfile's commands exist and
work, its environment is a valid configuration once auth is set, and the compose file is coherent."""

from __future__ import annotations

import re
import shlex
from dataclasses import fields

import pytest
import yaml

from imgsvc.config import ConfigError, Settings, env_name
from tests.conftest import REPO, ServerProcess, free_port
from tests.test_config import run_cli

DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
KNOWN = {env_name(f.name) for f in fields(Settings)}


def dockerfile_env() -> dict[str, str]:
    block = re.search(r"^ENV (.*?)(?=^\S)", DOCKERFILE.split("FROM", 2)[2], re.M | re.S)
    assert block is not None
    pairs = shlex.split(block.group(1).replace("\\\n", " "))
    return dict(pair.split("=", 1) for pair in pairs)


def test_the_image_runs_as_a_user_with_data_in_a_volume_and_a_healthcheck() -> None:
    assert re.search(r"^USER 10001$", DOCKERFILE, re.M)
    assert re.search(r"^VOLUME /data$", DOCKERFILE, re.M)
    assert re.search(r'^HEALTHCHECK .* CMD \["imgsvc", "healthcheck"\]$', DOCKERFILE, re.M)
    assert re.search(r'^CMD \["imgsvc", "serve"\]$', DOCKERFILE, re.M)
    env = dockerfile_env()
    assert env["VIPS_CONCURRENCY"].isdigit() and env["MALLOC_ARENA_MAX"].isdigit()
    assert env["IMGSVC_DATA_DIR"] == "/data" and "apt-get install" not in DOCKERFILE  # libvips from the wheel
    assert {k for k in env if k.startswith("IMGSVC_")} <= KNOWN


def test_the_image_environment_demands_delegated_auth() -> None:
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("IMGSVC_")}
    with pytest.raises(ConfigError, match="loopback"):
        Settings.from_env(env)  # 0.0.0.0 with auth=none is refused
    jwks = {"IMGSVC_AUTH": "jwks", "IMGSVC_AUTH_JWKS_URL": "http://main/jwks", "IMGSVC_AUTH_ISSUER": "http://main",
            "IMGSVC_AUTH_AUDIENCE": "imgsvc"}  # fmt: skip
    assert Settings.from_env({**env, **jwks}).host == "0.0.0.0"


def test_the_compose_file_describes_a_valid_scaled_out_deployment() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"imgsvc", "postgres", "s3", "nginx"}
    environment = services["imgsvc"]["environment"]
    assert set(environment) <= KNOWN, set(environment) - KNOWN
    filled = {k: re.sub(r"\$\{(\w+)(:[?-][^}]*)?\}", "x" * 40, str(v)) for k, v in environment.items()}
    filled["IMGSVC_SIGNING_KEYS"] = "k1:" + "s" * 40
    filled["IMGSVC_AUTH_JWKS_URL"] = "http://main/jwks"
    filled["IMGSVC_PUBLIC_URL"] = "https://img.example.com"
    settings = Settings.from_env({**{k: v for k, v in dockerfile_env().items() if k.startswith("IMGSVC_")},
                                  **filled})  # fmt: skip
    assert settings.storage_url == "s3://imgsvc/originals" and settings.auth == "jwks"


def test_the_compose_nginx_config_is_the_template_pointed_at_the_imgsvc_service() -> None:
    from tests.nginx_process import config_builder

    mount = COMPOSE["services"]["nginx"]["volumes"][0].split(":")[0]
    values = {
        "UPSTREAM": "imgsvc:8080",
        "USER": "nginx",
        "ERROR_LOG": "/dev/stderr",
        "ACCESS_LOG": "/dev/stdout",
        "DENY_LIST": "off",
        "CACHE_VALID": "second",
    }  # the nginx.org image has no Lua module: revalidation
    assert (REPO / mount).read_text() == config_builder().build(values)


def test_healthcheck_command_follows_readiness(server_env: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = ServerProcess(server_env, tmp_path / "server.log").start()
    try:
        env = {"IMGSVC_PORT": str(server.port)}
        ok = run_cli("healthcheck", env=env)
        assert (ok.returncode, ok.stdout.strip()) == (0, "ready")
    finally:
        server.stop()
    down = run_cli("healthcheck", "--timeout", "1", env={"IMGSVC_PORT": str(free_port())})
    assert down.returncode == 1 and "not ready" in down.stderr
