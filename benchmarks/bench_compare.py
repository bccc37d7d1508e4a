"""Correctness checks run before anything is timed: weightmerge's output against mergekit's output
or against the in-memory ``merge_state_dicts`` on the same inputs.

Outputs are read with the ``safetensors`` library (not weightmerge's reader). For each tensor we
record the number of differing elements, the largest absolute difference and the largest distance
in units in the last place (ulp: the difference of the values' positions in the ordered set of
representable numbers of the stored dtype; 0 = bit-identical).

Two kinds of mergekit comparison are not bit-for-bit by nature and get their own checks:

* ``ties`` keeps exactly k entries per tensor; entries whose magnitude equals the k-th largest
  (frequent with bf16 inputs, whose deltas take few distinct values) are broken differently
  (mergekit: the order of an unstable ``argsort``; weightmerge: lowest index). ``tie_explained``
  checks that every differing element sits where some expert's |delta| equals that expert's
  threshold; anything else is counted as ``unexplained`` and fails the check.
* DARE draws its drops from a different random stream; at density < 1 the outputs are compared
  statistically (``dare_stats``: per large tensor, the fraction of changed entries and the L1
  norm of the merged delta), and bit-for-bit at density 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

Getter = Callable[[str], torch.Tensor]


class CheckpointDir:
    """Read-only view of a (possibly sharded) safetensors checkpoint directory."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            single = self.path / "model.safetensors"
            with safe_open(str(single), framework="pt") as f:
                weight_map = {k: single.name for k in f.keys()}  # noqa: SIM118
        self.weight_map = weight_map
        self._handles: dict[str, Any] = {}
        self._open = safe_open

    def keys(self) -> list[str]:
        return sorted(self.weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self.weight_map[name]
        if f not in self._handles:
            self._handles[f] = self._open(str(self.path / f), framework="pt")
        return self._handles[f].get_tensor(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self[k] for k in self.keys()}


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Integers with the same order as the float values (adjacent floats differ by 1)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        v = t.contiguous().view(torch.int16).to(torch.int64)
        return torch.where(v < 0, -32768 - v, v)
    if t.dtype == torch.float32:
        v = t.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(v < 0, -(2**31) - v, v)
    if t.dtype == torch.float64:
        v = t.contiguous().view(torch.int64)
        return torch.where(v < 0, -(2**63) - v, v)  # may wrap for huge distances; fine for 0/1 ulp
    raise TypeError(f"not a floating dtype: {t.dtype}")


def tensor_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"dtype {a.dtype} != {b.dtype}")
    if not a.is_floating_point():
        n = int((a != b).sum())
        return {"n_diff": n, "max_abs": float(n > 0), "max_ulp": float(n > 0)}
    diff = a != b
    n = int(diff.sum())
    if n == 0:
        return {"n_diff": 0, "max_abs": 0.0, "max_ulp": 0.0}
    max_abs = float((a.double() - b.double()).abs().max())
    max_ulp = float((ordered_bits(a) - ordered_bits(b)).abs().max())
    return {"n_diff": n, "max_abs": max_abs, "max_ulp": max_ulp}


def compare(
    ours: Mapping[str, torch.Tensor] | CheckpointDir,
    ref: Mapping[str, torch.Tensor] | CheckpointDir,
    *,
    per_tensor: Callable[[str, torch.Tensor, torch.Tensor, dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Summary of the differences between two checkpoints (same names, shapes, dtypes required)."""
    names_a = sorted(ours.keys())
    names_b = sorted(ref.keys())
    if names_a != names_b:
        only_a = sorted(set(names_a) - set(names_b))[:5]
        only_b = sorted(set(names_b) - set(names_a))[:5]
        return {"ok": False, "error": f"tensor names differ: only ours {only_a}, only reference {only_b}"}
    total = {"n_elements": 0, "n_diff": 0, "max_abs": 0.0, "max_ulp": 0.0, "tensors_differing": 0}
    worst = ""
    extra: dict[str, float] = {}
    for name in names_a:
        a, b = ours[name], ref[name]
        try:
            d = tensor_diff(a, b)
        except ValueError as err:
            return {"ok": False, "error": f"tensor {name!r}: {err}"}
        total["n_elements"] += a.numel()
        total["n_diff"] += int(d["n_diff"])
        total["tensors_differing"] += int(d["n_diff"] > 0)
        if d["max_ulp"] > total["max_ulp"]:
            worst = name
        total["max_abs"] = max(total["max_abs"], d["max_abs"])
        total["max_ulp"] = max(total["max_ulp"], d["max_ulp"])
        if per_tensor is not None:
            for k, v in per_tensor(name, a, b, d).items():
                extra[k] = extra.get(k, 0.0) + v
    return {**total, "worst_tensor": worst, **extra}


# ---------------------------------------------------------------------------------------------
# mergekit TIES: differences explained by ties at the trim threshold


def tie_explained(
    base: CheckpointDir, experts: Sequence[CheckpointDir], *, density: float
) -> Callable[[str, torch.Tensor, torch.Tensor, dict[str, float]], dict[str, float]]:
    """A per-tensor hook counting differing elements *not* at some expert's k-th magnitude."""

    def hook(name: str, a: torch.Tensor, b: torch.Tensor, d: dict[str, float]) -> dict[str, float]:
        if d["n_diff"] == 0 or density >= 1:
            return {"unexplained": 0.0, "tie_entries": 0.0}
        b0 = base[name].to(torch.float32)
        at_threshold = torch.zeros(b0.shape, dtype=torch.bool)
        n = b0.numel()
        k = max(1, int(density * n))
        for e in experts:
            mag = (e[name].to(torch.float32) - b0).abs().reshape(-1)
            thr = torch.kthvalue(mag, n - k + 1).values
            at_threshold |= (mag == thr).reshape(b0.shape)
        unexplained = (a != b) & ~at_threshold
        return {"unexplained": float(unexplained.sum()), "tie_entries": float(at_threshold.sum())}

    return hook


# ---------------------------------------------------------------------------------------------
# DARE: statistical agreement at density < 1


def dare_stats(
    ours: CheckpointDir, ref: CheckpointDir, base: CheckpointDir, *, min_numel: int = 100_000
) -> dict[str, Any]:
    """Fraction of entries changed from the base and L1 norm of (output - base), ours vs reference.

    Per tensor with at least ``min_numel`` entries, and in total. With n = 1e5+ independent
    Bernoulli drops the relative noise of either statistic is well under 1 %.
    """
    tot = {"changed_ours": 0, "changed_ref": 0, "l1_ours": 0.0, "l1_ref": 0.0, "numel": 0}
    worst = {"changed_rel": 0.0, "l1_rel": 0.0}
    for name in ours:
        b = base[name].to(torch.float32)
        if b.numel() < min_numel:
            continue
        a, r = ours[name].to(torch.float32), ref[name].to(torch.float32)
        ca, cr = int((a != b).sum()), int((r != b).sum())
        la, lr = float((a - b).abs().sum()), float((r - b).abs().sum())
        tot["changed_ours"] += ca
        tot["changed_ref"] += cr
        tot["l1_ours"] += la
        tot["l1_ref"] += lr
        tot["numel"] += b.numel()
        worst["changed_rel"] = max(worst["changed_rel"], abs(ca - cr) / max(cr, 1))
        worst["l1_rel"] = max(worst["l1_rel"], abs(la - lr) / max(lr, 1e-30))
    return {
        **tot,
        "changed_rel": abs(tot["changed_ours"] - tot["changed_ref"]) / max(tot["changed_ref"], 1),
        "l1_rel": abs(tot["l1_ours"] - tot["l1_ref"]) / max(tot["l1_ref"], 1e-30),
        "worst_tensor_changed_rel": worst["changed_rel"],
        "worst_tensor_l1_rel": worst["l1_rel"],
    }


# ---------------------------------------------------------------------------------------------
# In-memory reference (run in a child process: it holds every input in memory)


def _iter_emr(art: Any, result: Any) -> Iterator[tuple[str, dict[str, float]]]:
    for name in sorted(result.unified):
        t = art.tensors[name]
        u_ref = result.unified[name].to(t.unified_dtype)
        yield name + " (unified)", tensor_diff(art.unified(name).to(t.unified_dtype), u_ref)
        for i in range(len(result.masks)):
            m = art.mask(i, name)
            yield f"{name} (mask {i})", tensor_diff(m, result.masks[i][name])


def reference_check(
    *,
    method: str,
    params: Mapping[str, Any],
    seed: int,
    base_dir: str | None,
    model_dirs: Sequence[str],
    out_dir: str,
) -> dict[str, Any]:
    """Merge in memory with ``merge_state_dicts`` and compare with the streamed output in ``out_dir``."""
    from weightmerge.api import merge_state_dicts

    base = CheckpointDir(base_dir).state_dict() if base_dir is not None else None
    models = [CheckpointDir(d).state_dict() for d in model_dirs]
    result = merge_state_dicts(base, models, method, dict(params), seed)
    if method == "emr":
        from weightmerge.emr import load_emr

        art = load_emr(out_dir)
        total = {"n_elements": 0, "n_diff": 0, "max_abs": 0.0, "max_ulp": 0.0, "tensors_differing": 0}
        for _name, d in _iter_emr(art, result):
            total["n_diff"] += int(d["n_diff"])
            total["tensors_differing"] += int(d["n_diff"] > 0)
            total["max_abs"] = max(total["max_abs"], d["max_abs"])
            total["max_ulp"] = max(total["max_ulp"], d["max_ulp"])
        total["n_elements"] = sum(t.numel() for t in result.unified.values())  # type: ignore[union-attr]
        resc = [float(r) for r in result.rescalers]  # type: ignore[union-attr]
        total["rescalers_equal"] = resc == [float(r) for r in art.rescalers]
        total["ok"] = total["n_diff"] == 0 and total["rescalers_equal"]
        return total
    assert isinstance(result, dict)
    res = compare(CheckpointDir(out_dir), result)
    res.setdefault("ok", res.get("n_diff", 1) == 0)
    return res


# ---------------------------------------------------------------------------------------------
# Entry points taking directories (the benchmark runs them in a child process, so its own
# memory stays small: a big parent would also inflate the peak RSS its children report)


def compare_dirs(
    ours_dir: str,
    ref_dir: str,
    *,
    base_dir: str | None = None,
    expert_dirs: Sequence[str] = (),
    tie_density: float | None = None,
) -> dict[str, Any]:
    """Compare two output directories; with ``tie_density``, also explain differences by ties."""
    hook = None
    if tie_density is not None:
        assert base_dir is not None
        hook = tie_explained(
            CheckpointDir(base_dir), [CheckpointDir(d) for d in expert_dirs], density=tie_density
        )
    return compare(CheckpointDir(ours_dir), CheckpointDir(ref_dir), per_tensor=hook)


def dare_stats_dirs(ours_dir: str, ref_dir: str, base_dir: str) -> dict[str, Any]:
    return dare_stats(CheckpointDir(ours_dir), CheckpointDir(ref_dir), CheckpointDir(base_dir))
