"""Stack outputs: `endpoint`, the bicep's six outputs, the active revision and image, the credentials of password
access, the adoption record, and the AI Toolkit's `infra/inference.config.json` (written after a real deployment only,
never in preview)."""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pulumi

from infra.access import EndpointAccess
from infra.adoption import ADOPTION_OUTPUT, Ledger
from infra.app import ContainerApp

TOOLKIT_CONFIG_FILE = Path("infra/inference.config.json")


def write_toolkit_config(values: Mapping[str, Any], path: Path = TOOLKIT_CONFIG_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(values), indent=2) + "\n", encoding="utf-8")


def export_outputs(
    *,
    subscription_id: str,
    resource_group_name: str,
    storage_account_name: pulumi.Input[str],
    file_share_name: pulumi.Input[str],
    app: ContainerApp,
    access: EndpointAccess,
    ledger: Ledger,
) -> None:
    """Exports the outputs. `activeRevision` changes whenever a `pulumi up` rolled a new revision (new image,
    settings or modelRevision); `accessUsername`/`accessPassword` in password mode."""
    bicep_outputs: dict[str, pulumi.Output[Any]] = {
        "SUBSCRIPTION_ID": pulumi.Output.from_input(subscription_id),
        "RESOURCE_GROUP_NAME": pulumi.Output.from_input(resource_group_name),
        "STORAGE_ACCOUNT_NAME": pulumi.Output.from_input(storage_account_name),
        "FILE_SHARE_NAME": pulumi.Output.from_input(file_share_name),
        "ACA_APP_NAME": app.name,
        "ACA_APP_ENDPOINT": app.fqdn,  # the bicep's output: the fqdn, no scheme
    }
    pulumi.export("endpoint", pulumi.Output.concat("https://", app.fqdn))
    pulumi.export("activeRevision", app.active_revision)
    pulumi.export("image", app.image)
    for name, value in bicep_outputs.items():
        pulumi.export(name, value)
    for name, credential in access.stack_outputs().items():  # the password is a secret output
        pulumi.export(name, credential)
    pulumi.export(ADOPTION_OUTPUT, ledger.output())
    if not pulumi.runtime.is_dry_run():
        pulumi.Output.all(**bicep_outputs).apply(write_toolkit_config)
