"""Sequence tasks with their metrics and trivial baselines, deterministic from a key.

``adding`` (the adding problem), ``copy_memory`` (the copy-memory task), ``char_lm``
(character-level language modelling on a text file, with a public-domain text shipped) and
``majority`` (sequence classification).
"""

from jaxrnn.tasks._tasks import (
    TASKS,
    Batch,
    Task,
    Vocabulary,
    adding,
    char_lm,
    copy_memory,
    get_task,
    majority,
    shipped_text,
)

__all__ = [
    "Batch",
    "TASKS",
    "Task",
    "Vocabulary",
    "adding",
    "char_lm",
    "copy_memory",
    "get_task",
    "majority",
    "shipped_text",
]
