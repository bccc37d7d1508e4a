"""PEFT adapters folded into their base model, tensor by tensor, as a TensorSource.

``PeftSource(adapter_dir, base=<base source>)`` exposes the base model's tensors with the adapter
merged in, the way PEFT's ``merge_and_unload`` would, computed lazily per tensor / row range:

- LoRA (``peft_type: LORA``), per targeted module with ``lora_A`` (r, in) and ``lora_B`` (out, r):
  ``W' = W + (B @ A) * s`` with ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
  ``use_rslora``; ``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern``
  (PEFT's matching: the first pattern key ``k`` with ``re.match(r"(.*\\.)?(k)$", module)``).
  Layers storing W as (in, out) (``fan_in_fan_out``, GPT-2's Conv1D) get ``(B @ A).T * s``;
  embedding LoRA (``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r)) likewise.
  Which layout a layer has is read from the shapes; only a square W falls back to the config's
  ``fan_in_fan_out``. ``lora_bias``: ``b' = b + lora_B.bias * s``. DoRA (``use_dora``,
  ``lora_magnitude_vector`` m): ``W' = m / ||W + ΔW||_row * (W + ΔW)``, norms per output unit.
- (IA)3 (``peft_type: IA3``), vector l per module: feed-forward modules (``feedforward_modules``,
  l stored (1, in)) scale W's input dim, the others (l stored (out, 1)) its output dim and their
  bias.
- Any other tensor in the adapter file (``modules_to_save`` copies, saved embedding layers, bias
  terms with ``bias="all"``) replaces the base tensor of that name (``.base_layer.`` dropped);
  a replacement absent from the base (e.g. a new head) is added. Replacements take the base
  tensor's dtype, as PEFT's loading into the base model does.

Names: adapter keys ``base_model.model.<module>.lora_A.weight`` map to ``<module>.weight`` of the
base. When the base checkpoint's names differ by a leading ``model.`` (adapter trained on a
``*ForCausalLM`` applied to a bare backbone checkpoint, or the reverse), the one consistent
renaming (none, strip ``model.``, add ``model.``) under which every targeted tensor exists is used
for the whole adapter; none fitting is an error naming the first unmatched tensor. A targeted
``lm_head.weight`` missing from a base with tied embeddings is read from the embedding
(see ``sources.tied_weights``).

Arithmetic runs in float32 (float64 for float64 weights); LoRA products are computed per aligned
block of BLOCK_ROWS rows, so a row range equals the same rows of a whole read bit for bit; the
result is cast once to the base dtype (PEFT adds a bf16/fp16-cast delta in the low precision, so
bf16 results may differ from PEFT's by one rounding). Refused with a clear error: other adapter
types (LoHa, LoKr, AdaLoRA, prompt tuning, ...), conv LoRA/IA3, DoRA on embeddings, LoRA options
that change the model beyond a weight delta (layer_replication, target_parameters,
trainable_token_indices, aLoRA, QALoRA, ...) and adapters whose initialisation changed the base
weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: convert them with PEFT's
``path_initial_model_for_weight_conversion`` first).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from weightmerge.io._common import check_rows, load_json
from weightmerge.io.base import TensorInfo, TensorSource
from weightmerge.io.tied import tied_weights

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SUPPORTED_TYPES = ("LORA", "IA3")
_PREFIX = "base_model.model."
# LoRA config options that make the adapted model more than "base + weight delta".
_REFUSED_OPTIONS = (
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva")
_OTHER_ADAPTER_MARKERS = ("lora_", "ia3_", "hada_", "lokr_", "oft_", "boft_", "vera_", "trainable_tokens")

BLOCK_ROWS = 512  # LoRA products are computed per aligned block of this many rows (see _lora_delta)

Layout = Literal["out_in", "in_out"]  # how W stores (out, in) or (in, out)


@dataclass(frozen=True)
class _Lora:
    a: str  # adapter tensor names
    b: str
    scaling: float
    layout: Layout
    magnitude: str | None = None  # DoRA


@dataclass(frozen=True)
class _LoraBias:
    b_bias: str
    scaling: float


@dataclass(frozen=True)
class _Ia3:
    l: str  # PEFT's name for the vector
    layout: Layout
    feedforward: bool


@dataclass(frozen=True)
class _Ia3Bias:
    l: str


Transform = _Lora | _LoraBias | _Ia3 | _Ia3Bias


@dataclass(frozen=True)
class _Plan:
    base_name: str | None  # read from the base under this name (it may be a tied embedding) ...
    replacement: str | None  # ... or from the adapter file under this name
    transform: Transform | None


@dataclass
class _Module:
    """Adapter tensors of one targeted module (names in the adapter file)."""

    a: str | None = None
    b: str | None = None
    b_bias: str | None = None
    emb_a: str | None = None
    emb_b: str | None = None
    magnitude: str | None = None
    ia3: str | None = None


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup for a module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _check_config(path: str, cfg: Any) -> str:
    if not isinstance(cfg, dict):
        raise ValueError(f"adapter config {path} must hold a JSON object")
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype not in SUPPORTED_TYPES:
        raise ValueError(
            f"adapter {path}: unsupported PEFT type {cfg.get('peft_type')!r} (supported: "
            f"{', '.join(SUPPORTED_TYPES)}). Merge it with PEFT's merge_and_unload(), save the result "
            "with save_pretrained(safe_serialization=True) and use that directory instead."
        )
    for opt in _REFUSED_OPTIONS:
        if cfg.get(opt):
            raise ValueError(
                f"adapter {path}: option {opt}={cfg[opt]!r} is not supported (it changes the model beyond "
                "a weight delta); merge with PEFT's merge_and_unload() instead"
            )
    init = str(cfg.get("init_lora_weights", "")).lower()
    if any(init.startswith(p) for p in _BASE_CHANGING_INITS):
        raise ValueError(
            f"adapter {path}: init_lora_weights={cfg['init_lora_weights']!r} changed the base weights during "
            "initialisation, so folding it into the original base would be wrong; convert it with PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...) first"
        )
    return ptype


def _open_weights(directory: str) -> TensorSource:
    from weightmerge.io.safetensors_io import SafetensorsFile
    from weightmerge.io.torchbin import TorchBinFile

    for fname in ADAPTER_WEIGHTS:
        p = os.path.join(directory, fname)
        if os.path.isfile(p):
            return SafetensorsFile(p) if fname.endswith(".safetensors") else TorchBinFile(p)
    raise FileNotFoundError(
        f"adapter directory {directory} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}"
    )


def _group(adapter: TensorSource) -> tuple[dict[str, _Module], dict[str, str]]:
    """Adapter tensors grouped by module, and replacement tensors (target name -> adapter name)."""
    roles = {
        ".lora_A.weight": "a",
        ".lora_B.weight": "b",
        ".lora_B.bias": "b_bias",
        ".lora_embedding_A": "emb_a",
        ".lora_embedding_B": "emb_b",
        ".lora_magnitude_vector": "magnitude",
        ".lora_magnitude_vector.weight": "magnitude",
        ".ia3_l": "ia3",
    }
    modules: dict[str, _Module] = {}
    replacements: dict[str, str] = {}
    for key in adapter.keys():  # noqa: SIM118  (a TensorSource is not iterable)
        name = key.removeprefix(_PREFIX)
        for suffix, role in roles.items():
            if name.endswith(suffix):
                mod = modules.setdefault(name[: -len(suffix)], _Module())
                setattr(mod, role, key)
                break
        else:
            last = name.rsplit(".", 2)
            if any(m in part for part in last for m in _OTHER_ADAPTER_MARKERS):
                raise ValueError(f"adapter tensor {key!r} has a form this reader does not support")
            target = name.replace(".base_layer.", ".")
            if target in replacements:
                raise ValueError(
                    f"adapter tensors {replacements[target]!r} and {key!r} both replace {target!r}"
                )
            replacements[target] = key
    return modules, replacements


def _layout(
    *, module: str, w_shape: tuple[int, ...], out_in: tuple[int, int], fan_in_fan_out: bool, what: str
) -> Layout:
    """Whether W is stored (out, in) or (in, out), from its shape (config flag only when square)."""
    out_dim, in_dim = out_in
    fits_oi = w_shape == (out_dim, in_dim)
    fits_io = w_shape == (in_dim, out_dim)
    if fits_oi and fits_io:
        return "in_out" if fan_in_fan_out else "out_in"
    if fits_oi:
        return "out_in"
    if fits_io:
        return "in_out"
    raise ValueError(
        f"adapter module {module!r}: {what} implies a weight of shape ({out_dim}, {in_dim}) (or its "
        f"transpose), but the base tensor has shape {w_shape}"
    )


class PeftSource:
    """A base model's tensors with a LoRA / (IA)3 adapter folded in (see the module docstring)."""

    def __init__(self, path: str, *, base: TensorSource) -> None:
        self.path = path
        self.base = base
        self.config = base.config
        cfg_path = os.path.join(path, ADAPTER_CONFIG)
        self.adapter_config: dict[str, Any] = load_json(cfg_path, what="adapter config")
        self.peft_type = _check_config(cfg_path, self.adapter_config)
        self.adapter = _open_weights(path)
        try:
            self._have = self._base_names()
            self._base_keys = set(base.keys())
            self._plans = self._plan()
        except BaseException:
            self.adapter.close()
            raise

    # ---- planning (headers only) -------------------------------------------------------------
    def _base_names(self) -> dict[str, str]:
        """Names readable from the base -> the base tensor holding them (tied embeddings included)."""
        keys = self.base.keys()
        names = {k: k for k in keys}
        for target, source in tied_weights(self.base.config, keys).items():
            names.setdefault(target, source)
        return names

    def _rename(self, modules: dict[str, _Module], replacements: dict[str, str]) -> Callable[[str], str]:
        have = self._have
        required = [f"{m}.weight" for m in modules]
        candidates: list[tuple[str, Callable[[str], str]]] = [
            ("as is", lambda n: n),
            ("without a leading 'model.'", lambda n: n.removeprefix("model.")),
            ("with 'model.' added", lambda n: "model." + n),
        ]
        fitting = [(label, f) for label, f in candidates if all(f(n) in have for n in required)]
        if not fitting:
            missing = next(n for n in required if n not in have)
            raise ValueError(
                f"adapter {self.path} targets {missing!r}, which base checkpoint {self.base.path} lacks "
                "(also tried its name without a leading 'model.' and with 'model.' added)"
            )
        return max(fitting, key=lambda lf: sum(lf[1](n) in have for n in replacements))[1]

    def _plan(self) -> dict[str, _Plan]:
        modules, replacements = _group(self.adapter)
        rename = self._rename(modules, replacements)
        have = self._have
        plans: dict[str, _Plan] = {}
        for target, key in replacements.items():
            plans[rename(target)] = _Plan(base_name=None, replacement=key, transform=None)
        for module, parts in sorted(modules.items()):
            for name, transform in self._module_transforms(module, parts, rename, plans):
                plan = plans.get(name)
                if name not in have and plan is None:
                    raise ValueError(
                        f"adapter module {module!r} changes {name!r}, which the base model lacks"
                    )
                plans[name] = _Plan(
                    base_name=None if plan is not None else have[name],
                    replacement=plan.replacement if plan is not None else None,
                    transform=transform,
                )
        return plans

    def _module_transforms(
        self, module: str, parts: _Module, rename: Callable[[str], str], plans: dict[str, _Plan]
    ) -> list[tuple[str, Transform]]:
        weight = rename(f"{module}.weight")
        bias = rename(f"{module}.bias")
        cfg = self.adapter_config
        fif = bool(cfg.get("fan_in_fan_out", False))

        def shape_of(name: str) -> tuple[int, ...] | None:  # after any replacement
            plan = plans.get(name)
            if plan is not None and plan.replacement is not None:
                return self.adapter.info(plan.replacement).shape
            return self.base.info(self._have[name]).shape if name in self._have else None

        w_shape = shape_of(weight)
        assert w_shape is not None  # _rename checked every targeted weight exists
        if self.peft_type == "IA3":
            if parts.ia3 is None or any(
                x is not None for x in (parts.a, parts.b, parts.emb_a, parts.emb_b, parts.magnitude)
            ):
                raise ValueError(f"IA3 adapter {self.path}: module {module!r} has unexpected tensors")
            return self._ia3_transforms(module, parts.ia3, weight, bias, w_shape, shape_of(bias), fif)
        if parts.ia3 is not None:
            raise ValueError(f"LoRA adapter {self.path}: module {module!r} has an IA3 vector")
        embedding = parts.emb_a is not None or parts.emb_b is not None
        a, b = (parts.emb_a, parts.emb_b) if embedding else (parts.a, parts.b)
        if a is None or b is None or (embedding and (parts.a is not None or parts.b is not None)):
            raise ValueError(
                f"LoRA adapter {self.path}: module {module!r} needs exactly one lora_A and lora_B pair"
            )
        a_shape, b_shape = self.adapter.info(a).shape, self.adapter.info(b).shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise ValueError(
                f"LoRA adapter {self.path}: module {module!r} has {len(a_shape)}-d LoRA factors (a conv "
                "layer?); only linear and embedding LoRA are supported"
            )
        rank = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
        dims = (b_shape[0], a_shape[1])  # (out, in) of B @ A; an embedding's W is (vocab, dim) = (in, out)
        if a_shape[0] != rank or b_shape[1] != rank:
            raise ValueError(
                f"LoRA adapter {self.path}: module {module!r} has factors {a} {a_shape} and {b} {b_shape}, "
                f"inconsistent with rank r={rank} from the adapter config"
            )
        if rank <= 0:
            raise ValueError(f"LoRA adapter {self.path}: module {module!r} has rank {rank}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            shown = repr(alpha) if len(repr(alpha)) <= 40 else repr(alpha)[:40] + "..."
            raise ValueError(
                f"LoRA adapter {self.path}: module {module!r} has lora_alpha {shown}, not a finite number"
            )
        scaling = float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        layout: Layout = (
            "in_out"
            if embedding
            else _layout(
                module=module, w_shape=w_shape, out_in=dims, fan_in_fan_out=fif, what="lora_B @ lora_A"
            )
        )
        if embedding and w_shape != (dims[1], dims[0]):
            raise ValueError(
                f"LoRA adapter {self.path}: embedding module {module!r} implies shape {(dims[1], dims[0])}, "
                f"base tensor {weight!r} has {w_shape}"
            )
        if parts.magnitude is not None:
            if embedding:
                raise ValueError(
                    f"LoRA adapter {self.path}: DoRA on embedding module {module!r} is not supported"
                )
            m_shape = self.adapter.info(parts.magnitude).shape
            if m_shape != (dims[0],):
                raise ValueError(
                    f"LoRA adapter {self.path}: DoRA magnitude of {module!r} has shape {m_shape}, "
                    f"expected ({dims[0]},)"
                )
        out: list[tuple[str, Transform]] = [(weight, _Lora(a, b, scaling, layout, parts.magnitude))]
        if parts.b_bias is not None:
            if shape_of(bias) != (dims[0],):
                raise ValueError(
                    f"LoRA adapter {self.path}: module {module!r} has a lora_B bias but the base has no "
                    f"matching bias {bias!r} of shape ({dims[0]},)"
                )
            out.append((bias, _LoraBias(parts.b_bias, scaling)))
        return out

    def _ia3_transforms(
        self,
        module: str,
        l_key: str,
        weight: str,
        bias: str,
        w_shape: tuple[int, ...],
        bias_shape: tuple[int, ...] | None,
        fif: bool,
    ) -> list[tuple[str, Transform]]:
        l_shape = self.adapter.info(l_key).shape
        if len(l_shape) != 2 or len(w_shape) != 2 or 1 not in l_shape:
            raise ValueError(
                f"IA3 adapter {self.path}: module {module!r} has vector {l_key} of shape {l_shape} for a "
                f"base weight of shape {w_shape}; only linear layers are supported"
            )
        ff_cfg = self.adapter_config.get("feedforward_modules") or []
        if isinstance(ff_cfg, str):
            feedforward = bool(re.fullmatch(ff_cfg, module))
        else:
            feedforward = any(module.endswith(t) for t in ff_cfg)
        if (feedforward and l_shape[0] != 1) or (not feedforward and l_shape[1] != 1):
            raise ValueError(
                f"IA3 adapter {self.path}: module {module!r} is {'' if feedforward else 'not '}a "
                f"feed-forward module per feedforward_modules, but its vector has shape {l_shape}"
            )
        if feedforward:
            n_in = l_shape[1]
            other = w_shape[0] if w_shape[1] == n_in else w_shape[1]
            dims = (other, n_in)
        else:
            n_out = l_shape[0]
            other = w_shape[1] if w_shape[0] == n_out else w_shape[0]
            dims = (n_out, other)
        layout = _layout(
            module=module, w_shape=w_shape, out_in=dims, fan_in_fan_out=fif, what="the IA3 vector"
        )
        out: list[tuple[str, Transform]] = [(weight, _Ia3(l_key, layout, feedforward))]
        if not feedforward and bias_shape is not None:
            if bias_shape != (dims[0],):
                raise ValueError(
                    f"IA3 adapter {self.path}: bias {bias!r} does not match vector {l_key} {l_shape}"
                )
            out.append((bias, _Ia3Bias(l_key)))
        return out

    # ---- the TensorSource interface ------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._base_keys | set(self._plans))

    def __contains__(self, name: object) -> bool:
        return name in self._plans or name in self._base_keys

    @property
    def changed(self) -> list[str]:
        """Names of the tensors the adapter changes or adds."""
        return sorted(self._plans)

    def info(self, name: str) -> TensorInfo:
        plan = self._plans.get(name)
        if plan is None:
            return self.base.info(name)
        if plan.replacement is None:
            assert plan.base_name is not None
            b = self.base.info(plan.base_name)
            return TensorInfo(name=name, shape=b.shape, dtype=b.dtype, file=f"{b.file} + {self.path}")
        a = self.adapter.info(plan.replacement)
        dtype = self.base.info(self._have[name]).dtype if name in self._have else a.dtype
        return TensorInfo(name=name, shape=a.shape, dtype=dtype, file=a.file)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        plan = self._plans.get(name)
        if plan is None:
            return self.base.read(name, rows)
        info = self.info(name)
        check_rows(name=name, shape=info.shape, rows=rows)
        if plan.replacement is not None:
            w = self.adapter.read(plan.replacement, rows)
        else:
            assert plan.base_name is not None
            w = self.base.read(plan.base_name, rows)
        if plan.transform is None:
            return w.to(info.dtype)
        if not w.is_floating_point():
            raise TypeError(f"adapter changes tensor {name!r}, which has non-float dtype {w.dtype}")
        cd = torch.float64 if w.dtype == torch.float64 else torch.float32
        out = self._apply(plan, name, w.to(cd), rows, cd)
        return out.to(info.dtype)

    def _full(self, plan: _Plan, name: str) -> torch.Tensor:
        if plan.replacement is not None:
            return self.adapter.read(plan.replacement)
        assert plan.base_name is not None
        return self.base.read(plan.base_name)

    def _apply(
        self, plan: _Plan, name: str, w: torch.Tensor, rows: tuple[int, int] | None, cd: torch.dtype
    ) -> torch.Tensor:
        t = plan.transform
        ad = self.adapter
        if isinstance(t, _Lora):
            if t.magnitude is not None and t.layout == "in_out" and rows is not None:
                # DoRA norms run over dim 0 here: compute on the whole tensor, then slice.
                whole = self._apply(plan, name, self._full(plan, name).to(cd), None, cd)
                return whole[rows[0] : rows[1]]
            start, stop = (0, w.shape[0]) if rows is None else rows
            merged = self._lora_delta(t, start, stop, cd).add_(w)  # = w + delta (addition commutes)
            if t.magnitude is None:
                return merged
            m = ad.read(t.magnitude).to(cd)
            if t.layout == "out_in":
                return (m[start:stop] / _norms(merged)).view(-1, 1) * merged
            return (m / _norms(merged.T)).view(1, -1) * merged
        if isinstance(t, _LoraBias):
            return w + ad.read(t.b_bias, rows).to(cd) * t.scaling
        if isinstance(t, _Ia3):
            vec = ad.read(t.l).to(cd)
            vec = vec.T if t.layout == "in_out" else vec
            if vec.shape[0] != 1 and rows is not None:
                vec = vec[rows[0] : rows[1]]
            return w * vec
        if isinstance(t, _Ia3Bias):
            vec = ad.read(t.l).to(cd).reshape(-1)
            return w * (vec if rows is None else vec[rows[0] : rows[1]])
        raise AssertionError(f"unknown transform {t!r}")

    def _lora_delta(self, t: _Lora, start: int, stop: int, cd: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of the scaled LoRA product, computed per aligned block of BLOCK_ROWS
        rows (each block by the same matmul call whatever range is asked), so that any row range
        equals the same rows of a whole-tensor read bit for bit."""
        ad = self.adapter
        a = _fresh(ad.read(t.a), cd)
        if t.layout == "out_in":
            n_rows, n_cols = ad.info(t.b).shape[0], a.shape[1]
            b = None
        else:
            b = _fresh(ad.read(t.b), cd)
            n_rows, n_cols = a.shape[1], b.shape[0]
        out = torch.empty((stop - start, n_cols), dtype=cd)
        for bs in range(start - start % BLOCK_ROWS, stop, BLOCK_ROWS):
            be = min(bs + BLOCK_ROWS, n_rows)
            # out_in: rows of B @ A; in_out: columns of B @ A, i.e. rows of its transpose
            block = _fresh(ad.read(t.b, (bs, be)), cd) @ a if b is None else (b @ _fresh(a[:, bs:be], cd)).T
            lo, hi = max(bs, start), min(be, stop)
            torch.mul(block[lo - bs : hi - bs], t.scaling, out=out[lo - start : hi - start])
        return out

    def close(self) -> None:
        self.adapter.close()


def _fresh(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy in freshly allocated (aligned) memory, so equal inputs meet BLAS equally."""
    out = torch.empty(t.shape, dtype=dtype)
    out.copy_(t)
    return out


def _norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, one row at a time (the same reduction whatever rows are present)."""
    return torch.stack([torch.linalg.vector_norm(r) for r in x]) if x.shape[0] else x.new_empty(0)
