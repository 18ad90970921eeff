"""Training with optax: a jitted train step, a resumable data-parallel `fit` driver, a
cell-plus-readout model and checkpoints.
"""

from jaxrnn.train._checkpoint import checkpoint_steps, restore_checkpoint, save_checkpoint
from jaxrnn.train._loop import (
    DataParallel,
    FitResult,
    TrainState,
    fit,
    init_state,
    make_data_parallel,
    make_train_step,
    place_batch,
    time_chunks,
)
from jaxrnn.train._model import (
    ModelParams,
    Readout,
    SequenceModel,
    sequence_model,
    task_loss,
    task_metric,
)

__all__ = [
    "DataParallel",
    "FitResult",
    "ModelParams",
    "Readout",
    "SequenceModel",
    "TrainState",
    "checkpoint_steps",
    "fit",
    "init_state",
    "make_data_parallel",
    "make_train_step",
    "place_batch",
    "restore_checkpoint",
    "save_checkpoint",
    "sequence_model",
    "task_loss",
    "task_metric",
    "time_chunks",
]
