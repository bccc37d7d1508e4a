"""EMR-Merging as a product: a compact artifact (unified task vector, 1-bit masks, rescalers),
per-task materialization and in-place task switching. See docs/emr-artifact.md.

Writing: :class:`EMRArtifactWriter` (streaming, fed by the engine's ``emr_sink``) or
:func:`write_emr_artifact` (an in-memory ``EMRResult``); both give byte-identical files.
Reading: :func:`load_emr` -> :class:`EMRArtifact` (``task_state_dict``, ``apply``, ``materialize``,
``info``).
"""

from __future__ import annotations

from weightmerge.emr.artifact import ArtifactError, EMRArtifact, TaskStateDict, load_emr, materialize
from weightmerge.emr.sources import DictSource, SourceTensors, base_identity, open_base
from weightmerge.emr.writer import EMRArtifactWriter, write_emr_artifact

__all__ = [
    "ArtifactError",
    "DictSource",
    "EMRArtifact",
    "EMRArtifactWriter",
    "SourceTensors",
    "TaskStateDict",
    "base_identity",
    "load_emr",
    "materialize",
    "open_base",
    "write_emr_artifact",
]
