"""Placeholder used while a method is being written (removed when every method has landed)."""

from __future__ import annotations

from weightmerge.methods.base import MethodSpec, TensorCtx


def stub(name: str) -> MethodSpec:
    def _apply(ctx: TensorCtx) -> object:
        raise NotImplementedError(f"method {name!r} is not implemented yet")

    return MethodSpec(name=name, summary="(not implemented yet)", paper="", params=(), apply=_apply)  # type: ignore[arg-type]
