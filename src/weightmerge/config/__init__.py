"""The merge configuration: a YAML file in mergekit's format (plus a few keys of our own),
validated once at the boundary into a :class:`MergeConfig` the engine reads.

Accepted document (mergekit 0.1.5 keys, then ours)::

    merge_method: ties                 # a name from weightmerge.methods.registry.METHODS
    base_model: path/to/base           # or BASE+LORA, or {model: ..., lora: ...}
    models:
      - model: path/to/a               # a checkpoint, BASE+ADAPTER, or a PEFT adapter directory
        parameters: {weight: 1.0, density: [0.2, 0.5, 0.8]}
    parameters:                        # global; models[i].parameters override these
      density:
        - filter: self_attn            # plain substring match on the tensor name, first match wins
          value: 0.3
        - value: 0.5
    dtype: bfloat16                    # mergekit's compute dtype, see "dtypes" below
    out_dtype: bfloat16
    tokenizer_source: base             # or a model path; or tokenizer: {source: ...}
    chat_template: chatml              # recorded, written with the output
    seed: 0                            # ours: seed of every random draw (DARE)
    exclude: ['classifier']            # ours: regexes (re.search); matching tensors keep the base value

Parameter settings follow mergekit: a scalar; a list of numbers = a *gradient* interpolated over
the layer index (``t = layer / (num_layers - 1)``, ``t = 1`` for a single layer, ``t = 0`` for
tensors outside the layer stack such as embeddings, final norm and lm_head); a list of booleans
or strings picks ``values[int(t * (len - 1))]``; a ``{filter, value}`` entry or a list of them picks
the first whose filter is absent, ``'*'`` or a substring of the tensor name, and falls through to
the next scope (model -> global -> method default) when none matches. In YAML a list is therefore
always a gradient, never "one value per model": per-model values go under ``models[i].parameters``.

Errors raise :class:`ConfigError` (a ValueError) naming the file and the location, e.g.
``models[1].parameters.densty: unknown parameter 'densty' for method 'ties' (did you mean
'density'?)``. The engine uses :meth:`MergeConfig.raw_params_for` / :meth:`params_by_tensor`
(per-tensor values, filters and gradients applied) and :meth:`MergeConfig.model_params`
(model-level values, for statistics passes and finalize). See docs/config.md.

The package, one job per module: ``errors`` (the one config error type, shared with the eval
config), ``schema`` (the document's keys and plain types), ``settings`` (mergekit's setting
language: gradients, filters, layer positions), ``loader`` (YAML -> :class:`MergeConfig`) and
``model`` (the resolved configuration the engine reads). Nothing here imports torch at import
time: ``weightmerge validate`` answers before any tensor library is loaded.
"""

from __future__ import annotations

from weightmerge.config.errors import ConfigError
from weightmerge.config.loader import MERGEKIT_IGNORED, load_config
from weightmerge.config.model import MergeConfig, ModelEntry, ModelRef
from weightmerge.config.schema import COMPUTE_DTYPES, FLOAT_DTYPES, MergeDocument
from weightmerge.config.settings import (
    Conditional,
    Filtered,
    Gradient,
    Scalar,
    Setting,
    evaluate,
    gradient_t,
    interpolate,
    layer_index_of,
    layer_positions,
)

__all__ = [
    "COMPUTE_DTYPES",
    "FLOAT_DTYPES",
    "MERGEKIT_IGNORED",
    "Conditional",
    "ConfigError",
    "Filtered",
    "Gradient",
    "MergeConfig",
    "MergeDocument",
    "ModelEntry",
    "ModelRef",
    "Scalar",
    "Setting",
    "evaluate",
    "gradient_t",
    "interpolate",
    "layer_index_of",
    "layer_positions",
    "load_config",
]
