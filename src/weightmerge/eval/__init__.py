"""Evaluation harness: benchmark tasks, expert fine-tuning, evaluation of merged models.

Submodules are imported explicitly (e.g. ``from weightmerge.eval.tasks import build_task``), so
importing this package pulls in neither torch-heavy code nor the task data.
"""
