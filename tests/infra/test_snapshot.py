"""What the program declares and outputs, for a few representative stacks, compared with golden files
(tests/infra/snapshots/<case>.json): every resource (type, name, parent, inputs, import id, options) and every stack
output. A refactoring must leave them unchanged; a change of behaviour updates them deliberately:
`UPDATE_SNAPSHOTS=1 pytest tests/infra/test_snapshot.py`, then review the diff and say why in the commit message."""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pulumi
import pytest

from tests.infra.azure_mocks import (
    SECRET_SIG_KEY,
    FakeAzure,
    ProgramRun,
    is_secret,
    run_program,
)
from tests.infra.stacks import GROUP, LOCATION, add_fine_tuning_layout

SNAPSHOTS = Path(__file__).parent / "snapshots"
BASE = {"resourceGroupName": GROUP, "location": LOCATION}
CLIENT_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def nothing(azure: FakeAzure) -> None:
    """Nothing exists in Azure yet."""


def fine_tuning(azure: FakeAzure) -> None:
    add_fine_tuning_layout(azure)


# case -> (what exists in Azure, stack config, secret keys)
CASES: dict[str, tuple[Callable[[FakeAzure], None], dict[str, Any], tuple[str, ...]]] = {
    "fresh": (nothing, BASE, ()),
    "adopt-fine-tuning": (fine_tuning, {"resourceGroupName": GROUP}, ()),
    "reference-fine-tuning": (fine_tuning, {"resourceGroupName": GROUP, "existingResources": "reference"}, ()),
    "prebuilt-image": (
        nothing,
        BASE | {"image": "contoso.azurecr.io/inference-app@sha256:" + "0a" * 32, "defaultCommands": ["cd /mount"]},
        (),
    ),
    "password-from-config": (
        nothing,
        BASE | {"accessUsername": "mlteam", "accessPassword": "correct-horse-battery"},
        ("accessPassword",),
    ),
    "public-allow-list": (nothing, BASE | {"access": "public", "allowedIpRanges": ["203.0.113.0/24"]}, ()),
    "entra": (
        nothing,
        BASE | {"access": "entra", "entraClientId": CLIENT_ID, "entraTenantId": TENANT_ID, "entraClientSecret": "s~1"},
        ("entraClientSecret",),
    ),
    "serverless-gpu": (
        nothing,
        BASE | {"location": "swedencentral", "gpu": "serverless-A100", "minReplicas": 0, "maxReplicas": 3},
        (),
    ),
}


def plain(value: Any) -> Any:
    """JSON-ready, secrets shown as {"secret": value} so that losing a secret marker is a diff too."""
    if is_secret(value):
        return {"secret": plain(value["value"])}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items() if key != SECRET_SIG_KEY}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if isinstance(value, pulumi.Resource):
        return f"{value._type}::{value._name}"  # noqa: SLF001 - no public accessor
    return value


def _alias(alias: Any) -> dict[str, Any]:
    """The program's own aliases (a moved resource keeping its URN); the SDK's API-version type aliases left out."""
    given = {key: plain(value) for key, value in vars(alias).items() if value is not ...}  # `...`: not given
    return {} if set(given) <= {"type_"} else given


def snapshot(run: ProgramRun) -> dict[str, Any]:
    azure = run.azure
    declared = {(d.typ, d.name): d for d in azure.declared}
    resources = []
    for registration in run.registrations:
        options = registration.options
        inputs = declared[(registration.typ, registration.name)]
        resources.append(
            {
                "type": registration.typ,
                "name": registration.name,
                "parent": "::".join(registration.parent) if registration.parent else None,
                "inputs": plain(inputs.raw_inputs),
                "import": inputs.import_id,
                "retainOnDelete": bool(options.retain_on_delete),
                "protect": bool(options.protect),
                "dependsOn": sorted(plain(list(cast(list[Any], options.depends_on or [])))),
                "aliases": [alias for alias in map(_alias, options.aliases or []) if alias],
            }
        )
    resources.sort(key=lambda entry: (entry["type"], entry["name"]))
    outputs = {name: {"secret": value} if name in run.secret_outputs else value for name, value in run.outputs.items()}
    return {"resources": resources, "outputs": outputs}


def without_build_hashes(document: Any, run: ProgramRun) -> Any:
    """The image's tag and digest hash inference_app/ (and the app's revision name hashes the digest): they change
    with every edit of the app, which is not what these snapshots are about."""
    text = json.dumps(document, indent=1, sort_keys=True)
    for image in run.azure.by_type("docker-build:index:Image"):
        tag = image.inputs["tags"][0].rsplit(":", 1)[1]
        text = text.replace(tag, "<tag>").replace(image.state["digest"], "<digest>")
        for app in run.azure.by_type("azure-native:app:ContainerApp"):
            text = text.replace(app.state["latestReadyRevisionName"], "<revision>")
    return json.loads(text)


@pytest.mark.parametrize("case", sorted(CASES))
def test_declared_resources_and_outputs_match_the_snapshot(in_scratch_dir: Path, case: str) -> None:
    arrange, config, secret_keys = CASES[case]
    azure = FakeAzure()
    arrange(azure)
    run = run_program(azure, config, secret_keys=secret_keys)
    actual = without_build_hashes(snapshot(run), run)
    path = SNAPSHOTS / f"{case}.json"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert actual == expected
