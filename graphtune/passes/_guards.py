"""Small predicates shared by pass guards. Each returns a reason string when unsafe, else None.

Sizes in a dynamo graph may be symbolic; a guard may only rely on what is *statically known*,
never on a hint (that would add a shape guard after capture or prove nothing for other shapes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def known_eq(a: Any, b: Any) -> bool:
    """True only when ``a == b`` holds for every shape the graph can see."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def check_tensor(name: str, t: torch.Tensor | None, *, dtypes=SUPPORTED_DTYPES) -> str | None:
    if t is None:
        return f"{name} has no recorded tensor metadata"
    if t.dtype not in dtypes:
        return f"{name} dtype {t.dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
    return None


def check_same_shape(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.dim() != b.dim() or not all(known_eq(x, y) for x, y in zip(a.shape, b.shape)):
        return f"cannot prove {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} have the same shape"
    return None


def check_literal_number(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} is not a literal number ({type(value).__name__})"
    return None
