"""The configuration table of docs/configuration.md, generated from :class:`service.settings.Settings`.

``python docs/config_table.py`` rewrites the table between the markers; tests/test_docs.py fails
when the committed table differs from what this renders (Settings is the one owner).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import AliasChoices  # noqa: E402

from service.settings import Settings  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"


def _default(field) -> str:
    if field.default_factory is not None:
        return "computed (see meaning)"
    v = field.default
    if v is None:
        return "unset"
    if hasattr(v, "get_secret_value"):
        return "unset"
    return f"`{json.dumps(v) if isinstance(v, dict | bool) else v}`"


def _names(name: str, field) -> str:
    if isinstance(field.validation_alias, AliasChoices):
        return " / ".join(f"`{a}`" for a in field.validation_alias.choices)
    prefix = Settings.model_config.get("env_prefix", "")
    return f"`{prefix}{name.upper()}`"


def render() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| {_names(name, field)} | {_default(field)} | {meaning} |")
    return "\n".join(rows)


def updated(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


if __name__ == "__main__":
    DOC.write_text(updated(DOC.read_text()))
    print(f"wrote {DOC.relative_to(ROOT)}")
