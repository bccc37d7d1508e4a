"""The method contract: what every merge method declares and receives.

A method is a :class:`MethodSpec`: a name, typed parameters, optional *statistics passes* (for
methods whose statistics span the whole model, e.g. paper TIES, global PCB, EMR's rescalers) and
an ``apply`` function that merges one tensor (or one row-chunk of it) given a :class:`TensorCtx`.

The same driver (``weightmerge.engine.driver``) runs every method both in memory
(``merge_state_dicts``) and streamed from checkpoint files, so the two agree bit for bit.

Statistics are declared, never computed ad hoc:

* :class:`Reduce` -- an associative reduction. ``fn`` returns float64 *per-row partials* of shape
  ``(n_models, rows_in_chunk)`` (row = slice along dim 0; 0-d and 1-d tensors are one row). The
  driver concatenates the partials of a tensor's chunks, reduces them once (so row-chunking never
  changes the bits), optionally divides by the tensor's numel (``per_tensor_mean``) and then
  reduces across tensors in sorted-name order.
* :class:`OrderStat` -- an exact order statistic per model row over the whole model: the value of
  rank ``rank(D)`` (0-based, ascending) of the float32 values ``fn`` yields, where ``D`` is the
  total number of values per row. Found exactly in two sweeps (a stratified sample brackets the
  rank, then the values inside the bracket are gathered and selected: ``engine.select.SampleSelect``),
  never by materialising the model, in ``fn``'s dtype (float32 or float64). If the bracket missed,
  a two-level radix select decides (two more sweeps; float64 then four more on the residuals, see
  ``engine.driver._refine_float64``).

* :class:`SampleCapture` -- no statistic of its own: the driver keeps the values ``fn`` yields at
  the positions the order statistics sample (the same positions for every statistic of a run), so
  that a later pass can build an order statistic's sample from them (``OrderStat.presample``)
  instead of sweeping the model to sample it. A pass whose order statistics all have a
  ``presample`` makes one sweep, not two: its reductions run in the gathering sweep. The sample
  only has to bracket the rank (the answer is exact whatever the bracket), so a presample need not
  equal the swept values bit for bit.

Stats produced by pass *k* are visible (``ctx.stats``) to the functions of later passes and to
``apply``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from weightmerge.io.output import CHECKPOINT, OutputFormat

if TYPE_CHECKING:
    from torch import Tensor

ParamKind = Literal["float", "int", "bool", "str", "float_list", "stats"]
# How a side input (a ``kind="stats"`` parameter: per-model tensors the user supplies, e.g. Fisher
# diagonals) is keyed; see ``weightmerge.methods.aux``:
#   "param"       -- by tensor name, the tensor's shape (a row chunk gets the same rows);
#   "module_gram" -- by module name (tensor "m.weight" <-> key "m"), a square (d, d) Gram matrix.
SideLayout = Literal["param", "module_gram"]


@dataclass(frozen=True)
class Param:
    """One user-facing parameter of a method (YAML / ``params`` name)."""

    name: str
    kind: ParamKind
    default: Any
    help: str
    per_model: bool = False  # a list with one value per model is accepted (or a scalar)
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value must be > low (else >=)
    high_open: bool = False  # True: value must be < high (else <=)
    required: bool = False
    tensor_scoped: bool = True  # may vary per tensor (filters / gradients); False = model-level
    layout: SideLayout = "param"  # kind "stats" only: how the side input is keyed (see SideLayout)
    # YAML values mergekit spells differently, read as ours: ((mergekit value, our value), ...)
    mergekit_values: tuple[tuple[Any, Any], ...] = ()


@dataclass(frozen=True)
class TensorCtx:
    """Everything a method sees for one tensor, or one row-chunk ``[row_start, row_stop)`` of it.

    ``x`` is a scratch buffer owned by the method for this call: ``(n_models, *chunk_shape)`` in the
    compute dtype, holding task vectors (theta_i - theta_0) when the method's ``inputs`` is
    ``"deltas"`` and raw weights when it is ``"weights"``. The method may overwrite it (the driver
    built it from the inputs and will not reuse it); this keeps peak memory at about
    (n_models + a few) x the tensor. User inputs are never mutated.
    """

    name: str
    base: Tensor | None  # (*chunk_shape) compute dtype, or None (no base model)
    x: Tensor  # (n_models, *chunk_shape)
    params: Mapping[str, Any]  # resolved for this tensor; per-model params are tuples of length n
    stats: Mapping[str, Tensor]  # finished global statistics of earlier passes
    seed: int
    full_shape: tuple[int, ...]
    row_start: int = 0  # chunk rows along dim 0 (0 for a whole tensor)
    aux: Mapping[str, Tensor] = field(default_factory=dict)  # per-tensor statistics, e.g. fisher
    # values several statistics of one pass share (e.g. PCB's |T| for lo and hi), computed once per
    # chunk and sweep; a method's own cache, keyed by the method's names
    memo: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return int(self.x.shape[0])

    @property
    def element_offset(self) -> int:
        """Flat index of the chunk's first element in the full tensor."""
        row_numel = 1
        for s in self.full_shape[1:]:
            row_numel *= s
        return self.row_start * row_numel


@dataclass(frozen=True)
class Reduce:
    key: str
    fn: Callable[[TensorCtx], Tensor]  # -> float64 (n_models, rows_in_chunk)
    op: Literal["sum", "max", "min"] = "sum"
    per_tensor_mean: bool = False  # divide each tensor's reduced partial by its numel


@dataclass(frozen=True)
class OrderStat:
    key: str
    fn: Callable[[TensorCtx], Tensor]  # -> float32|float64 (n_models, numel_in_chunk), no NaN
    rank: Callable[[int], int]  # total count per row D -> 0-based ascending rank
    # (stats so far, captures so far) -> (n_models, sample length): the values ``fn`` would give at
    # the sampling positions, built from earlier passes' SampleCaptures; None: sample by a sweep
    presample: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor] | None = None
    # fn never yields NaN (e.g. |T| of task vectors the method has checked finite in the same
    # sweep): the driver then skips its own NaN check of the values
    nan_free: bool = False


@dataclass(frozen=True)
class SampleCapture:
    key: str
    fn: Callable[[TensorCtx], Tensor]  # -> (k, numel_in_chunk), kept at the sampling positions


StatRequest = Reduce | OrderStat | SampleCapture


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    paper: str
    params: tuple[Param, ...]
    # The merged tensor (chunk) in the compute dtype, or whatever the method's ``output`` format
    # takes (EMR: an ``EMRTensor``).
    apply: Callable[[TensorCtx], Any]
    inputs: Literal["deltas", "weights"] = "deltas"
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    # Statistics passes, built from the model-level params: a list of passes, each a list of requests.
    passes: Callable[[Mapping[str, Any]], Sequence[Sequence[StatRequest]]] = lambda _p: ()
    # True: apply() may be called on row chunks of a tensor (its result on a chunk is the matching
    # rows of its result on the whole tensor: no whole-tensor statistic inside apply). A callable
    # decides from the model-level params (e.g. PCB: global scope is chunkable, per_tensor is not).
    row_chunkable: bool | Callable[[Mapping[str, Any]], bool] = True
    # Cross-parameter validation on model-level params; raise ValueError with a clear message.
    check: Callable[[Mapping[str, Any], int], None] = lambda _p, _n: None
    # Plan-time rule on which parameters vary per tensor (filters, gradients), run before any tensor
    # data is read by the config loader (so ``weightmerge validate`` reports it) and by the planner:
    # (model-level params, {param name: where it varies}) -> raise ValueError naming the param.
    check_varying: Callable[[Mapping[str, Any], Mapping[str, str]], None] = lambda _p, _v: None
    # Model-level outputs computed from the final statistics (EMR: {"rescalers": [...]}).
    finalize: Callable[[Mapping[str, Tensor], Mapping[str, Any]], dict[str, Any]] = lambda _s, _p: {}
    # What the results become (weightmerge.io.output): a checkpoint, or the method's own format.
    output: OutputFormat = CHECKPOINT
    # mergekit parameters of this method that change nothing here: accepted with a note, dropped.
    # ((name, why), ...)
    mergekit_ignored: tuple[tuple[str, str], ...] = ()
    # A note for configs that set base_model without listing it under models, when that differs
    # from mergekit (linear: mergekit averages the base in).
    unlisted_base_note: str | None = None
    # True: the result does not depend on the order of the models (their per-model parameters and
    # statistics permuted with them) beyond float rounding. A callable decides from the model-level
    # params (random draws are seeded by the model's index: DARE is order-dependent only when it
    # drops something). tests/test_method_contract.py checks the claim both ways.
    order_invariant: bool | Callable[[Mapping[str, Any]], bool] = False
    # Parameter sets (YAML names, scalars or per-model lists) that tests/test_method_contract.py
    # merges besides the defaults: one for each variant or code path worth holding to the contract.
    examples: tuple[Mapping[str, Any], ...] = ()

    def is_order_invariant(self, model_params: Mapping[str, Any]) -> bool:
        return self.order_invariant(model_params) if callable(self.order_invariant) else self.order_invariant

    def is_row_chunkable(self, model_params: Mapping[str, Any]) -> bool:
        return self.row_chunkable(model_params) if callable(self.row_chunkable) else bool(self.row_chunkable)

    @property
    def aux_inputs(self) -> tuple[str, ...]:
        """The side inputs the method reads from ``ctx.aux``: its ``kind="stats"`` parameters."""
        return tuple(p.name for p in self.params if p.kind == "stats")

    def check_rules(
        self, model_params: Mapping[str, Any], n_models: int, varying: Mapping[str, str] | None = None
    ) -> None:
        """Every plan-time rule of the method: ``check`` on the model-level params, then
        ``check_varying`` with the parameters that vary per tensor (``{name: where}``)."""
        self.check(model_params, n_models)
        self.check_varying(model_params, dict(varying or {}))


def row_partials(t: Tensor, full_ndim: int, op: Literal["sum", "max", "min"] = "sum") -> Tensor:
    """Per-row float64 partials ``(n_models, rows)`` of a stacked chunk ``t`` of shape (n, *chunk_shape).

    A row is a slice along the tensor's dim 0; tensors of 0 or 1 dims are a single row.
    """
    n = t.shape[0]
    t = t.to(torch.float64)
    flat = t.reshape(n, 1, -1) if full_ndim <= 1 else t.reshape(n, t.shape[1], -1)
    if flat.shape[-1] == 0:
        fill = {"sum": 0.0, "max": -float("inf"), "min": float("inf")}[op]
        return torch.full(flat.shape[:2], fill, dtype=torch.float64, device=t.device)
    if op == "sum":
        return flat.sum(dim=-1)
    if op == "max":
        return flat.amax(dim=-1)
    return flat.amin(dim=-1)
