"""Azure Resource Manager's ``uniqueString()`` template function, bit for bit.

The AI Toolkit's bicep names resources ``<prefix><first 5 characters of uniqueString(resourceGroup().id)>``; this
program must derive the same names to find what the fine-tuning step created.

Algorithm (Microsoft's own code, MIT licensed, not documented on Microsoft Learn):
``Azure.Deployments.Expression`` (``UniqueStringFunction``) joins its arguments with ``-``, hashes the UTF-8 bytes
with the 64-bit MurmurHash variant in ``Microsoft.WindowsAzure.ResourceStack.Common.Algorithms.ComputeHash``
(package ``Microsoft.PowerPlatform.ResourceStack``; seed 0), and writes the 64-bit hash as 13 base-32 characters
from the alphabet ``a-z2-7``, most significant bits first, which is RFC 4648 base 32 of the hash's 8 big-endian
bytes, lowercased, without padding. Described with ports in
https://gist.github.com/maskati/23f329e7db43c00184143f04498e537c and
https://stackoverflow.com/questions/43295720/azure-arm-uniquestring-function-mimic .
This is not ``mmh3``: it is a two-lane, 32-bit-word variant with its own constants.
"""

import base64

_MASK32 = 0xFFFFFFFF
_C1 = 0x239B961B
_C2 = 0xAB0E9789


def unique_string(*values: str) -> str:
    """Return ARM's ``uniqueString(values...)``: 13 characters of ``a-z2-7``.

    Case-sensitive, like ARM: ``/resourceGroups/RG`` and ``/resourcegroups/rg`` give different results, so pass the
    resource group id exactly as Azure spells it.
    """
    if not values:
        raise ValueError("uniqueString needs at least one value")
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"uniqueString takes strings only, got {type(value).__name__}: {value!r}")
    hash_value = _murmur_hash64("-".join(values).encode("utf-8"))
    return base64.b32encode(hash_value.to_bytes(8, "big")).decode("ascii").rstrip("=").lower()


def _rotate_left32(value: int, count: int) -> int:
    return ((value << count) | (value >> (32 - count))) & _MASK32


def _final_mix32(value: int) -> int:
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & _MASK32
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & _MASK32
    return value ^ (value >> 16)


def _mix_lane1(word: int) -> int:
    return (_rotate_left32((word * _C1) & _MASK32, 15) * _C2) & _MASK32


def _mix_lane2(word: int) -> int:
    return (_rotate_left32((word * _C2) & _MASK32, 17) * _C1) & _MASK32


def _murmur_hash64(data: bytes) -> int:
    """Microsoft's MurmurHash64 variant (seed 0): two 32-bit lanes over 8-byte little-endian blocks."""
    length = len(data)
    lane1 = lane2 = 0
    block_end = length - length % 8
    for offset in range(0, block_end, 8):
        lane1 ^= _mix_lane1(int.from_bytes(data[offset : offset + 4], "little"))
        lane1 = (_rotate_left32(lane1, 19) + lane2) & _MASK32
        lane1 = (lane1 * 5 + 0x561CCD1B) & _MASK32
        lane2 ^= _mix_lane2(int.from_bytes(data[offset + 4 : offset + 8], "little"))
        lane2 = (_rotate_left32(lane2, 13) + lane1) & _MASK32
        lane2 = (lane2 * 5 + 0x0BCAA747) & _MASK32
    tail = data[block_end:]
    if tail:
        lane1 ^= _mix_lane1(int.from_bytes(tail[:4], "little"))
        if len(tail) > 4:
            lane2 ^= _mix_lane2(int.from_bytes(tail[4:], "little"))
    lane1 ^= length
    lane2 ^= length
    lane1 = (lane1 + lane2) & _MASK32
    lane2 = (lane2 + lane1) & _MASK32
    lane1 = _final_mix32(lane1)
    lane2 = _final_mix32(lane2)
    lane1 = (lane1 + lane2) & _MASK32
    lane2 = (lane2 + lane1) & _MASK32
    return (lane2 << 32) | lane1
