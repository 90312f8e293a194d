"""``ServeSettings``: one model for ``safetygame serve``'s flags, environment, config file and
its workers (issue 21, item 11)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import SecretStr

from safetygame.cli import main
from safetygame.errors import ConfigError
from safetygame.gateway.auth import hash_key
from safetygame.gateway.http import HttpLimits
from safetygame.gateway.settings import GatewaySettings, ServeSettings
from safetygame.gateway.workers import worker_command

SECRET = "sk-upstream-secret-never-on-argv"


def non_default_values(tmp_path: Path) -> dict[str, Any]:
    """A valid value different from the default for EVERY field of ServeSettings (a new field
    fails ``test_the_values_cover_every_field`` until it gets one here)."""
    tenants = tmp_path / "tenants.yml"
    tenants.write_text(yaml.safe_dump({"tenants": {"a": {"keys": [hash_key("k" * 40)]}}}))
    return {
        "upstream": "http://127.0.0.1:9/v1",
        "policy": "fast",
        "tenants_file": tenants,
        "host": "127.0.0.2",
        "port": 0,
        "model": "upstream-model",
        "served_model": "sg-test",
        "audit_url": f"sqlite:///{tmp_path / 'audit.db'}",
        "upstream_api_key": SECRET,
        "timeout": 33.0,
        "upstream_concurrency": 7,
        "upstream_transport": "httpx",
        "max_body_bytes": 5000,
        "reload_interval": 0.25,
        "max_header_bytes": 4096,
        "max_header_count": 20,
        "header_timeout": 3.5,
        "keepalive_timeout": 2.5,
        "stream_keepalive": 4.5,
        "log_level": "warning",
        "workers": 3,
    }


def plain(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def test_the_values_cover_every_field(tmp_path: Path) -> None:
    values = non_default_values(tmp_path)
    assert set(values) == set(ServeSettings.model_fields)
    for name, info in ServeSettings.model_fields.items():
        if not info.is_required():
            assert values[name] != info.default, name


def test_every_option_reaches_a_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every field, given as its flag to the supervisor, arrives unchanged in a worker."""
    import safetygame.cli.serve as serve_mod
    import safetygame.gateway.workers as workers_mod

    values = non_default_values(tmp_path)
    argv = ["serve"]
    for name, value in values.items():
        argv += [ServeSettings.flags(name)[0], str(value)]
    spawned: dict[str, Any] = {}

    def fake_run_workers(
        command: list[str], host: str, port: int, workers: int, on_ready: Any, *, stdin: str
    ) -> None:
        spawned.update(command=command, host=host, port=port, workers=workers, stdin=stdin)

    monkeypatch.setattr(workers_mod, "run_workers", fake_run_workers)
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, res.output
    assert (spawned["host"], spawned["port"], spawned["workers"]) == ("127.0.0.2", 0, 3)
    assert spawned["command"] == worker_command()
    assert not any(SECRET in arg for arg in spawned["command"])  # the key is not on argv

    served: list[tuple[ServeSettings, int | None]] = []
    monkeypatch.setattr(serve_mod, "serve_one", lambda s, fd, ready: served.append((s, fd)))
    worker_argv = [*spawned["command"][spawned["command"].index("serve") :], "--fd", "5"]
    res = CliRunner().invoke(main, worker_argv, input=spawned["stdin"])
    assert res.exit_code == 0, res.output
    [(settings, fd)] = served
    assert fd == 5
    for name, value in values.items():
        assert plain(getattr(settings, name)) == value, name


def test_a_worker_ignores_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = ServeSettings.load({"upstream": "http://127.0.0.1:9", "timeout": 9.0})
    monkeypatch.setenv("SAFETYGAME_TIMEOUT", "77")
    monkeypatch.setenv("SAFETYGAME_POLICY", "fast")
    assert ServeSettings.from_worker_json(parent.worker_json()) == parent


def test_source_order_flags_env_file_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "serve.yml"
    config.write_text(
        yaml.safe_dump(
            {"upstream": "http://file:1", "timeout": 11.0, "port": 1111, "served_model": "file"}
        )
    )
    monkeypatch.setenv("SAFETYGAME_TIMEOUT", "22")
    monkeypatch.setenv("SAFETYGAME_PORT", "2222")
    monkeypatch.setenv("SAFETYGAME_UPSTREAM_API_KEY", SECRET)
    s = ServeSettings.load({"port": 3333}, config)
    assert s.port == 3333  # flag > env
    assert s.timeout == 22.0  # env > file
    assert s.served_model == "file" and s.upstream == "http://file:1"  # file > default
    assert s.max_body_bytes == GatewaySettings().max_body_bytes  # the app's defaults
    assert s.header_timeout == HttpLimits().header_timeout
    assert s.api_key == SECRET and SECRET not in repr(s)
    monkeypatch.delenv("SAFETYGAME_PORT")
    assert ServeSettings.load({"upstream": "embedded"}).port == 8000  # the next call: no file


def test_gateway_settings_are_built_from_the_serve_settings() -> None:
    s = ServeSettings.load(
        {"upstream": "embedded", "served_model": "m", "timeout": 5.0, "max_header_count": 9}
    )
    gw = s.gateway()
    assert (gw.model_name, gw.decision_timeout, gw.http.max_header_count) == ("m", 5.0, 9)
    assert ServeSettings.load({"upstream": "embedded"}).gateway() == GatewaySettings()


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ({"upstream_concurrency": 0}, {}, "--upstream-concurrency (env SAFETYGAME_UPSTREAM_"),
        ({}, {"SAFETYGAME_MAX_BODY_BYTES": "10"}, "max_body_bytes must be >= 1024"),
        ({}, {"SAFETYGAME_MAX_HEADERS": "9"}, None),  # not a setting's variable: ignored
        ({"workers": 65}, {}, "--workers (env SAFETYGAME_WORKERS)"),
    ],
)
def test_bad_values_name_their_flag_and_variable(
    flags: dict[str, Any],
    env: dict[str, str],
    expected: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if expected is None:
        ServeSettings.load({"upstream": "embedded", **flags})
        return
    with pytest.raises(ConfigError, match="invalid gateway settings") as info:
        ServeSettings.load({"upstream": "embedded", **flags})
    assert expected in str(info.value)


def test_serve_cli_errors(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["serve"])
    assert res.exit_code == 2 and "--upstream (env SAFETYGAME_UPSTREAM)" in res.output
    bad = tmp_path / "bad.yml"
    bad.write_text("upstream: embedded\nno_such_setting: 1\n")
    res = CliRunner().invoke(main, ["serve", "--config", str(bad)])
    assert res.exit_code == 2 and "no_such_setting" in res.output
    res = CliRunner().invoke(main, ["serve", "--settings-stdin", "--port", "1"], input="{}")
    assert res.exit_code == 2 and "takes no other settings" in res.output
