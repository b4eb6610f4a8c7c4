"""The checks of untrusted JSON that stay in Python: stager files' trees, the wire's messages,
dcp metadata.

Python decodes that JSON and checks the shape of its values here (objects, lists, integers,
floats) before building anything from them. The bounds of tensor views (storage indices,
sizes, strides, offsets, dtypes) are not checked here but by the engine, the one validator of
untrusted layouts (``_native.TensorTable.from_layout``, ``rust/table.rs``).
"""

from __future__ import annotations

from typing import Any

from ._native import StagerError

__all__ = ["MAX_DIMS", "expect", "fail", "float_field", "int_field", "is_int_list"]

#: The most dimensions a tensor, a mesh or a shard may have in stager files and on the wire.
MAX_DIMS = 64


def fail(reason: str) -> StagerError:
    """The error for metadata that fails a check."""
    return StagerError(f"invalid checkpoint metadata: {reason}")


def expect(condition: bool, reason: str) -> None:
    """Raises :func:`fail` ``(reason)`` unless ``condition``."""
    if not condition:
        raise fail(reason)


def int_field(value: Any, what: str, minimum: int | None = 0) -> int:
    """``value`` when it is an integer (not a bool) of at least ``minimum`` (None: any)."""
    expect(type(value) is int, f"{what} must be an integer, got {type(value).__name__}")
    if minimum is not None:
        expect(value >= minimum, f"{what} must be >= {minimum}, got {value}")
    return value


def float_field(value: Any, what: str) -> float:
    """A JSON number, or one of the strings ``"nan"``, ``"inf"``, ``"-inf"`` JSON cannot hold."""
    if isinstance(value, str):
        expect(value in ("nan", "inf", "-inf"), f"{what}: bad float {value!r}")
        return float(value)
    expect(type(value) in (int, float), f"{what} must be a number")
    return float(value)


def is_int_list(value: Any, minimum: int = 0, max_len: int | None = MAX_DIMS, length: int | None = None) -> bool:
    """Whether ``value`` is a list of integers (not bools) of at least ``minimum``, with at most
    ``max_len`` items (None: any number) and, when given, exactly ``length``."""
    return (
        type(value) is list
        and (max_len is None or len(value) <= max_len)
        and (length is None or len(value) == length)
        and all(type(v) is int and v >= minimum for v in value)
    )
