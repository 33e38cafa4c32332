"""Tasks built by name: `config.task` selects the training objective.

    task = tasks.get_task(config)      # a t3d_jax.tasks.base.Task
    model = task.build_model(nnx.Rngs(0))
    loss, metrics = task.loss(model, batch, step=0)

Registered tasks (one module each):

    clip  CT-CLIP-style contrastive alignment of volume views and reports (tasks/clip.py)
    t3d   clip + Text-informed Multi-view Alignment (tasks/t3d.py)
    supervised  18-label classification with the same image encoder: the ceiling (tasks/supervised.py)
    segmentation  per-voxel classes: the image encoder + UNETR / U-Net decoder, Dice + CE (tasks/segmentation.py)
    mg3d  MG-3D: text-gated masked volume reconstruction, image-gated masked report modelling, CML/DCL/SSM (tasks/mg3d.py)
    reportgen  report generation: a GPT-2 decoder cross-attending to the image encoder's tokens (tasks/reportgen.py)
    msvlm  clip + masked slice-embedding modelling on the MS-VLM image encoder (tasks/msvlm.py)

To add a method, write `t3d_jax/tasks/<name>.py` with a `Task` subclass and add one line to
`TASKS` below; the train loop, step, checkpointing and AOT compile need no change.
"""

from __future__ import annotations

from t3d_jax.tasks import clip, mg3d, msvlm, reportgen, segmentation, supervised, t3d
from t3d_jax.tasks.base import Task
from t3d_jax.utils import UserValueError

TASKS: dict[str, type[Task]] = {
    "clip": clip.ClipTask,
    "t3d": t3d.T3DTask,
    "supervised": supervised.SupervisedTask,
    "segmentation": segmentation.SegmentationTask,
    "reportgen": reportgen.ReportGenTask,
    "mg3d": mg3d.MG3DTask,
    "msvlm": msvlm.MSVLMTask,
}


def get_task(config) -> Task:
    """The task named by `config.task`, built with `config`."""
    name = str(config.get("task", "") or "")
    if name not in TASKS:
        raise UserValueError(f"config.task={name!r}: unknown task; choose one of {sorted(TASKS)}")
    return TASKS[name](config)
