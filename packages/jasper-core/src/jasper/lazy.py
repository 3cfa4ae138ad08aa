"""torch, imported where the first tensor is made rather than at ``import jasper``.

``import torch`` costs about 1.5 s; listing backends, ``jasper info`` and reading a dataset's
metadata need none of it. A module that makes tensors only inside functions binds ``torch`` to
:func:`lazy_torch` instead of importing it: the first attribute looked up on it (``torch.empty``,
``torch.Tensor`` in an ``isinstance``) imports torch and puts the real module in that module's
globals, so later uses cost nothing extra. Type checkers see the real import::

    if TYPE_CHECKING:
        import torch
    else:
        torch = lazy_torch(globals())
"""

from __future__ import annotations

from typing import Any


class _LazyTorch:
    __slots__ = ("_namespace",)

    def __init__(self, namespace: dict[str, Any]) -> None:
        self._namespace = namespace

    def __getattr__(self, attr: str) -> Any:
        import torch

        self._namespace["torch"] = torch  # the module's global is the real torch from now on
        return getattr(torch, attr)

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


def lazy_torch(namespace: dict[str, Any]) -> Any:
    """A stand-in for ``torch`` in the module whose ``globals()`` is ``namespace``."""
    return _LazyTorch(namespace)


__all__ = ["lazy_torch"]
