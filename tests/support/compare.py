"""Find and print the first difference between two normalised outcomes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MISSING = "<missing>"


@dataclass(frozen=True, slots=True)
class Difference:
    """Where two values first differ: a field path and each side's value there."""

    field: str
    left: Any
    right: Any


def first_difference(left: Any, right: Any, path: str = "") -> Difference | None:
    """The first differing field in a depth-first walk (dict keys in left's order), or None."""
    if isinstance(left, dict) and isinstance(right, dict):
        for key in [*left, *(k for k in right if k not in left)]:
            sub = f"{path}[{key!r}]" if path.endswith("headers") or path.endswith("trailers") \
                else f"{path}.{key}" if path else str(key)
            if key not in left or key not in right:
                return Difference(sub, left.get(key, MISSING), right.get(key, MISSING))
            d = first_difference(left[key], right[key], sub)
            if d:
                return d
        return None
    if isinstance(left, list) and isinstance(right, list):
        for i, (a, b) in enumerate(zip(left, right)):
            d = first_difference(a, b, f"{path}[{i}]")
            if d:
                return d
        if len(left) != len(right):
            i = min(len(left), len(right))
            return Difference(f"{path}[{i}]", left[i] if i < len(left) else MISSING,
                              right[i] if i < len(right) else MISSING)
        return None
    if left != right or type(left) is not type(right):
        return Difference(path or "<value>", left, right)
    return None


def _show(v: Any) -> str:
    return v if v == MISSING else json.dumps(v, default=str)


def format_difference(case: str, index: int, request: str, diff: Difference,
                      left_name: str = "envoy", right_name: str = "wasmproxy",
                      left: Any = None, right: Any = None) -> str:
    """A failure message naming the case, request number, field and both values."""
    width = max(len(left_name), len(right_name)) + 1
    lines = [
        f"case {case!r}, request #{index} ({request}): first difference at {diff.field}",
        f"  {left_name + ':':<{width}} {_show(diff.left)}",
        f"  {right_name + ':':<{width}} {_show(diff.right)}",
    ]
    if left is not None or right is not None:
        lines += [f"full {left_name} outcome:   {json.dumps(left, default=str)}",
                  f"full {right_name} outcome: {json.dumps(right, default=str)}"]
    return "\n".join(lines)
