"""The documents that are generated from code stay equal to what the code says."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config_table():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "docs" / "config_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configuration_table_is_generated_from_settings():
    mod = _config_table()
    text = mod.DOC.read_text()
    assert mod.updated(text) == text, "docs/configuration.md is stale: run `python docs/config_table.py`"


def test_configuration_table_names_every_setting():
    from service.settings import Settings

    table = _config_table().render()
    for name in Settings.model_fields:
        assert f"MTRANK_{name.upper()}" in table, name
