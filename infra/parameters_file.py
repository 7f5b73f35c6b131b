"""Read the AI Toolkit's legacy ARM parameters file (`infra/provision/inference.parameters.json`).

Its non-null values become defaults for the Pulumi configuration (Pulumi config wins; `null` means "use the
default"), so a user migrating from the toolkit's bicep keeps their customised names and sizes.
"""

import json
from pathlib import Path
from typing import Any

from infra.errors import ConfigError

DEFAULT_PATH = Path("infra/provision/inference.parameters.json")

# The parameters the toolkit's inference.bicep declares; anything else in the file is a mistake worth reporting.
KNOWN_PARAMETERS = (
    "location",
    "maximumInstanceCount",
    "defaultCommands",
    "resourceSuffix",
    "storageAccountName",
    "fileShareName",
    "acaEnvironmentName",
    "acaEnvironmentStorageName",
    "acaAppName",
    "acaLogAnalyticsName",
)


def read_parameters_file(path: Path = DEFAULT_PATH) -> dict[str, Any]:
    """Return the file's non-null parameter values by name ({} when the file does not exist)."""
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error}); fix the file or delete it") from error
    parameters = document.get("parameters") if isinstance(document, dict) else None
    if not isinstance(parameters, dict):
        raise ConfigError(f'{path}: expected an ARM parameters file {{"parameters": {{"name": {{"value": ...}}}}}}')
    unknown = sorted(set(parameters) - set(KNOWN_PARAMETERS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown parameter(s) {', '.join(unknown)}; known parameters are {', '.join(KNOWN_PARAMETERS)}"
        )
    values: dict[str, Any] = {}
    for name, entry in parameters.items():
        if not isinstance(entry, dict) or "value" not in entry:
            raise ConfigError(f'{path}: parameter {name} must be an object {{"value": ...}}')
        if entry["value"] is not None:
            values[name] = entry["value"]
    return values
