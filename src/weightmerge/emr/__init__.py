"""EMR-Merging as a product: a compact artifact (unified task vector, 1-bit masks, rescalers),
per-task materialization and in-place task switching. See docs/emr-artifact.md.

In memory: :class:`EMRResult` (what ``merge_state_dicts(..., "emr")`` returns; ``result.py``).
Writing: :class:`EMRArtifactWriter` (streaming; ``weightmerge merge`` feeds it through EMR's
output format, ``output.py``) or :func:`write_emr_artifact` (an in-memory ``EMRResult``); both
give byte-identical files. Reading: :func:`load_emr` -> :class:`EMRArtifact` (``task_state_dict``,
``apply``, ``materialize``, ``info``; ``reader.py``).
"""

from __future__ import annotations

from weightmerge.emr.reader import ArtifactError, EMRArtifact, TaskStateDict, load_emr, materialize
from weightmerge.emr.result import EMRResult, EMRTensor, emr_reconstruct
from weightmerge.emr.sources import base_identity, open_base
from weightmerge.emr.writer import EMRArtifactWriter, write_emr_artifact
from weightmerge.io.memory import DictSource

__all__ = [
    "ArtifactError",
    "DictSource",
    "EMRArtifact",
    "EMRArtifactWriter",
    "EMRResult",
    "EMRTensor",
    "TaskStateDict",
    "base_identity",
    "emr_reconstruct",
    "load_emr",
    "materialize",
    "open_base",
    "write_emr_artifact",
]
