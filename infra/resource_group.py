"""The resource group everything lives in: created when missing, else adopted or referenced like the rest."""

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import resources

from infra.adoption import Adoption, Ledger, declare_or_reference, mirror_inputs, stack_tags


@dataclass(frozen=True)
class ResourceGroupArgs:
    group: Adoption
    location: str  # of a new group
    ledger: Ledger


class ResourceGroup(pulumi.ComponentResource):
    name: pulumi.Output[str]

    def __init__(self, name: str, args: ResourceGroupArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:ResourceGroup", name, None, opts)
        foreign = args.group.foreign
        group = declare_or_reference(
            args.group,
            args.ledger,
            lambda options: resources.ResourceGroup(
                "resource-group",
                resource_group_name=args.group.name,
                **(
                    mirror_inputs(foreign, resources.ResourceGroupArgs)
                    if foreign is not None
                    else {"location": args.location, "tags": stack_tags()}
                ),
                # Declared at the stack's root before this component existed: the alias keeps its URN, so that
                # stacks deployed before are not asked to delete and recreate their group.
                opts=pulumi.ResourceOptions.merge(
                    options, pulumi.ResourceOptions(aliases=[pulumi.Alias(parent=pulumi.ROOT_STACK_RESOURCE)])
                ),
            ),
            parent=self,
            # Deleting a group deletes everything in it, the retained storage account and share included.
            always_retain=True,
        )
        # A referenced group: its name as Azure spells it (infra/plan.py), which may differ in case from the config.
        self.name = group.output("name") if group.resource is not None else pulumi.Output.from_input(args.group.name)
        self.register_outputs({"name": self.name})
