"""Checkpoint I/O: lazy sources for every supported layout, the sharded writer, atomic outputs."""

from weightmerge.io.atomic import atomic_output_dir, copy_tokenizer_files
from weightmerge.io.base import TensorInfo, TensorSource
from weightmerge.io.sources import detect_layout, open_source, tied_weights
from weightmerge.io.writer import ShardedSafetensorsWriter

__all__ = [
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "TensorSource",
    "atomic_output_dir",
    "copy_tokenizer_files",
    "detect_layout",
    "open_source",
    "tied_weights",
]
