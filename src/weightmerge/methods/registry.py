"""The explicit registry of merge methods: name -> MethodSpec. Add new methods here."""

from __future__ import annotations

from weightmerge.methods import (
    breadcrumbs,
    cart,
    consensus_ta,
    dare,
    della,
    doge_ta,
    emr,
    fisher,
    iso_c,
    iso_cts,
    karcher,
    linear,
    lines,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    pcb,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv_m,
    wudi,
)
from weightmerge.methods._params import did_you_mean
from weightmerge.methods.base import MethodSpec

# Every task-vector method that returns one model takes the LiNeS options (methods/lines.py).
METHODS: dict[str, MethodSpec] = {
    spec.name: lines.wrap(spec) if lines.applies_to(spec) else spec
    for spec in (
        linear.SPEC,
        task_arithmetic.SPEC,
        ties.SPEC,
        dare.LINEAR_SPEC,
        dare.TIES_SPEC,
        pcb.SPEC,
        emr.SPEC,
        fisher.SPEC,
        regmean.SPEC,
        breadcrumbs.SPEC,
        breadcrumbs.TIES_SPEC,
        della.SPEC,
        della.LINEAR_SPEC,
        model_stock.SPEC,
        slerp.SPEC,
        nearswap.SPEC,
        passthrough.SPEC,
        sce.SPEC,
        nuslerp.SPEC,
        multislerp.SPEC,
        karcher.SPEC,
        tsv_m.SPEC,
        iso_c.SPEC,
        iso_cts.SPEC,
        consensus_ta.SPEC,
        cart.SPEC,
        wudi.SPEC,
        doge_ta.SPEC,
    )
}


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string name, got {type(name).__name__}")
    try:
        return METHODS[name]
    except KeyError:
        alias = name.replace("-", "_").lower()
        hint = f" (did you mean {alias!r}?)" if alias in METHODS else did_you_mean(name, list(METHODS))
        raise ValueError(f"unknown merge method {name!r}{hint}; known: {sorted(METHODS)}") from None
