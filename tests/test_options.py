"""The run-config schema (common/options.py) is the one declaration of every key: the files that list
keys are generated from it and checked against it here."""
from dataclasses import fields
from pathlib import Path

from common.options import BY_KEY, OPTIONS, pyproject_table, readme_table
from common.settings import CLIENT_KEYS, DEFAULTS, AppConfig, parse_run_config

ROOT = Path(__file__).resolve().parents[1]
REGEN = 'regenerate with: python -c "from common.options import {0}; print({0}(), end=\'\')"'


def test_pyproject_app_config_is_the_schema_table():
    """`flwr run --run-config` refuses keys the app config lacks: pyproject.toml holds the generated table."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("[tool.flwr.app.config]"):text.index("[tool.pytest.ini_options]")].rstrip("\n") + "\n"
    assert block == pyproject_table(), REGEN.format("pyproject_table")


def test_docs_run_config_table_is_the_schema_table():
    text = (ROOT / "docs" / "configuration.md").read_text()
    start, end = "<!-- run-config:start -->\n", "<!-- run-config:end -->"
    assert text[text.index(start) + len(start):text.index(end)] == readme_table(), REGEN.format("readme_table")


def test_appconfig_fields_and_client_keys_follow_the_schema():
    assert [f.name for f in fields(AppConfig)] == [o.attr for o in OPTIONS]
    assert list(DEFAULTS) == [o.key for o in OPTIONS] and len(BY_KEY) == len(OPTIONS)
    assert set(CLIENT_KEYS) == {o.key for o in OPTIONS if o.side == "both"}
    cfg = parse_run_config()
    assert cfg.to_dict() == {**DEFAULTS, "lr": cfg.lr}  # lr 0 resolves to the method's tuned rate
    # server-only keys never travel to the nodes
    assert not {o.key for o in OPTIONS if o.side == "server"} & set(cfg.client_config())


def test_every_choice_is_enforced_with_the_key_in_the_message():
    import pytest

    for o in OPTIONS:
        if o.choices:
            with pytest.raises(ValueError, match=f"run config '{o.key}'"):
                parse_run_config({o.key: "not-a-choice"})
