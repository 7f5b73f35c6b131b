"""Log Analytics workspace that receives the container apps' logs."""

from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_azure_native import operationalinsights

from infra.adoption import Adoption, Ledger, declare_or_reference, mirror_inputs, stack_tags


@dataclass(frozen=True)
class MonitoringArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    workspace: Adoption
    ledger: Ledger


def _workspace_args(args: MonitoringArgs) -> dict[str, Any]:
    existing = args.workspace.foreign
    if existing is not None:  # an existing workspace (sku, retention, region) is kept as it is
        return mirror_inputs(existing, operationalinsights.WorkspaceArgs)
    return dict(
        sku=operationalinsights.WorkspaceSkuArgs(name=operationalinsights.WorkspaceSkuNameEnum.PER_GB2018),
        location=args.location,
        tags=stack_tags(),
    )


class Monitoring(pulumi.ComponentResource):
    customer_id: pulumi.Output[str]
    shared_key: pulumi.Output[str]  # secret

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:Monitoring", name, None, opts)
        workspace = declare_or_reference(
            args.workspace,
            args.ledger,
            lambda options: operationalinsights.Workspace(
                "workspace",
                workspace_name=args.workspace.name,
                resource_group_name=args.resource_group_name,
                **_workspace_args(args),
                opts=options,
            ),
            parent=self,
        )
        self.customer_id = workspace.output("customer_id")
        workspace_name = workspace.output("name")
        keys = operationalinsights.get_shared_keys_output(
            resource_group_name=args.resource_group_name,
            workspace_name=workspace_name,
            opts=pulumi.InvokeOutputOptions(depends_on=workspace.dependencies),
        )
        self.shared_key = pulumi.Output.secret(keys.primary_shared_key.apply(lambda key: key or ""))
        self.register_outputs({"customerId": self.customer_id})
