"""Write the configuration table in docs/configuration.md from Pulumi.yaml, where every key is declared once.

Run `python docs/config_reference.py` after adding or changing a key in Pulumi.yaml; tests/test_docs.py fails while
the table is out of date.
"""

import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILE = ROOT / "Pulumi.yaml"
DOC_FILE = ROOT / "docs" / "configuration.md"
START = "<!-- config-table:start (generated from Pulumi.yaml by docs/config_reference.py) -->"
END = "<!-- config-table:end -->"


def _type(entry: dict[str, Any]) -> str:
    kind = str(entry["type"])
    if kind == "array":
        kind = f"list of {entry['items']['type']}"
    return f"{kind}, secret" if entry.get("secret") else kind


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(project: dict[str, Any]) -> str:
    rows = ["| Key | Type | Declared default | Meaning |", "|---|---|---|---|"]
    for key, entry in project["config"].items():
        default = f"`{json.dumps(entry['default'])}`" if "default" in entry else ""
        rows.append(f"| `{key}` | {_type(entry)} | {default} | {_cell(entry['description'])} |")
    return "\n".join(rows)


def updated_document(document: str, project: dict[str, Any]) -> str:
    before, rest = document.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{render_table(project)}\n{END}{after}"


def main() -> None:
    project = yaml.safe_load(PROJECT_FILE.read_text(encoding="utf-8"))
    DOC_FILE.write_text(updated_document(DOC_FILE.read_text(encoding="utf-8"), project), encoding="utf-8")


if __name__ == "__main__":
    main()
