"""Log Analytics workspace that receives the container apps' logs."""

from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_azure_native import operationalinsights

from infra.adoption import Adoption, mirror_inputs


@dataclass(frozen=True)
class MonitoringArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    workspace: Adoption


def _workspace_args(args: MonitoringArgs) -> dict[str, Any]:
    existing = args.workspace.existing
    if existing is not None:  # an existing workspace (sku, retention, region) is kept as it is
        return mirror_inputs(existing, operationalinsights.WorkspaceArgs)
    return dict(
        sku=operationalinsights.WorkspaceSkuArgs(name=operationalinsights.WorkspaceSkuNameEnum.PER_GB2018),
        location=args.location,
    )


class Monitoring(pulumi.ComponentResource):
    customer_id: pulumi.Output[str]
    shared_key: pulumi.Output[str]  # secret

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:Monitoring", name, None, opts)
        depends_on: list[pulumi.Resource] = []
        self.resource_ids: dict[str, pulumi.Output[str]] = {}
        if args.workspace.declared:
            workspace = operationalinsights.Workspace(
                "workspace",
                workspace_name=args.workspace.name,
                resource_group_name=args.resource_group_name,
                **_workspace_args(args),
                opts=args.workspace.options(parent=self),
            )
            self.customer_id = workspace.customer_id
            workspace_name = workspace.name
            self.resource_ids[args.workspace.key] = workspace.id
            depends_on.append(workspace)
        else:
            self.customer_id = pulumi.Output.from_input(args.workspace.existing.customer_id)
            workspace_name = pulumi.Output.from_input(args.workspace.name)

        keys = operationalinsights.get_shared_keys_output(
            resource_group_name=args.resource_group_name,
            workspace_name=workspace_name,
            opts=pulumi.InvokeOutputOptions(depends_on=depends_on),
        )
        self.shared_key = pulumi.Output.secret(keys.primary_shared_key.apply(lambda key: key or ""))
        self.register_outputs({"customerId": self.customer_id})
