"""ARM uniqueString() against outputs published by others (real ARM, ARM's own library, and independent ports)."""

import base64
import re

import pytest

from infra.unique_string import _murmur_hash64, unique_string

PUBLISHED_PAIRS = [
    # Computed with ARM's server-side DLLs (Azure Stack Hub Development Kit) and with Microsoft's
    # Azure.Deployments.Expression package, in the accepted answer of
    # https://stackoverflow.com/questions/43295720/azure-arm-uniquestring-function-mimic
    pytest.param(("tyeth",), "zcztcwvu6iyg6", id="stackoverflow-arm-dlls"),
    # "valueFromArmTemplate" for a resource id from a real deployment, in Microsoft's marketplace deployment tool
    # https://github.com/microsoft/commercial-marketplace-offer-deploy (test ArmFunctionsTests.cs, later revision;
    # an earlier revision in test/Tests/ had "yeygmhukyx3qg" for the same id and was replaced by this value).
    pytest.param(
        (
            "/subscriptions/31e9f9a0-9fd2-4294-a0a3-0101246d9700/resourceGroups/rg-modm201-20230913120256"
            "/providers/Microsoft.Compute/virtualMachines/bobjacmodm201",
        ),
        "yvjxno3je5on2",
        id="microsoft-marketplace-resource-id",
    ),
    # A resource group id, the exact shape this program hashes. DevOps Shield's test
    # AzureNaming.Utilities.Tests/TestArmFunctions.cs (https://github.com/devopsshield); that project reads its
    # unique strings from real ARM deployments (support/azure-marketplace/getUniqueString.psm1 in
    # https://github.com/devopsshield/devops-shield).
    pytest.param(
        ("/subscriptions/3c7f956b-55ee-4686-9d30-da1eb631dc59/resourceGroups/rg-devopsshieldek010dev",),
        "fd63l2gacbtca",
        id="devopsshield-resource-group-id",
    ),
    # Terraform provider arm2tf's acceptance tests, one and several arguments:
    # https://github.com/cloud-maker-ai/terraform-provider-arm2tf/blob/main/internal/provider/resource_unique_string_test.go
    pytest.param(("test",), "rbgf3xv4ufgzg", id="arm2tf-single"),
    pytest.param(("test", "test2", "test3"), "bqgd334z2uj64", id="arm2tf-three-arguments"),
    # https://github.com/JasonWhall/go-azure-uniquestring (README)
    pytest.param(("hello", "world"), "a7wkljktk6wne", id="go-azure-uniquestring"),
]


@pytest.mark.parametrize(("values", "expected"), PUBLISHED_PAIRS)
def test_matches_published_arm_outputs(values: tuple[str, ...], expected: str) -> None:
    assert unique_string(*values) == expected


def test_hash_matches_published_intermediate_value() -> None:
    # The 64-bit hash of "hello-world" before base-32 encoding, as printed in
    # https://github.com/JasonWhall/go-azure-uniquestring (README)
    assert _murmur_hash64(b"hello-world") == 571013382255652050


def test_arguments_are_joined_with_a_hyphen() -> None:
    assert unique_string("hello", "world") == unique_string("hello-world")
    assert unique_string("a", "b", "c") == unique_string("a-b", "c") == unique_string("a-b-c")
    assert unique_string("ab") != unique_string("a", "b")


def test_empty_string_hashes_to_zero() -> None:
    # Zero bytes leave both lanes at the seed 0 and the final mix maps 0 to 0, so every 5-bit group is "a".
    assert _murmur_hash64(b"") == 0
    assert unique_string("") == "aaaaaaaaaaaaa"
    assert unique_string("", "") == unique_string("-")


def rfc4648_base32(hash_value: int) -> str:
    """The standard library's RFC 4648 base-32 of the 8 big-endian hash bytes, lowercased, padding dropped."""
    return base64.b32encode(hash_value.to_bytes(8, "big")).decode("ascii").rstrip("=").lower()


def test_hashes_utf8_bytes() -> None:
    # ARM hashes UTF-8 (Encoding.UTF8), not .NET's UTF-16 string: "é" is the two bytes C3 A9.
    text = "déjà vu"
    assert unique_string(text) == rfc4648_base32(_murmur_hash64(text.encode("utf-8")))
    assert unique_string(text) != rfc4648_base32(_murmur_hash64(text.encode("utf-16-le")))
    assert unique_string(text) != unique_string("deja vu")


def test_is_case_sensitive_like_arm() -> None:
    # ARM compares group names case-insensitively but uniqueString does not: callers must keep Azure's casing.
    group_id = "/subscriptions/3c7f956b-55ee-4686-9d30-da1eb631dc59/resourceGroups/rg-devopsshieldek010dev"
    assert unique_string(group_id.lower()) != unique_string(group_id)


@pytest.mark.parametrize("length", range(0, 20))
def test_every_tail_length_gives_13_base32_characters(length: int) -> None:
    result = unique_string("x" * length)
    assert re.fullmatch(r"[a-z2-7]{13}", result)


def test_rejects_no_arguments_and_non_strings() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        unique_string()
    with pytest.raises(TypeError, match="strings only"):
        unique_string("rg", None)  # type: ignore[arg-type]
