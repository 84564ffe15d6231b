"""Self-supervised tasks behind one interface (`make_batch` = `apply` of a `draw`, `loss`), shared by train and adapt."""

from tta_cli.config import TaskConfig
from tta_cli.errors import TTAError
from tta_cli.tasks.masked import MaskedTask
from tta_cli.tasks.rotation import RotationTask

TASKS = ("rotation", "masked")


def build_task(config: TaskConfig, view_pad_mode: str = "zeros"):
    """The task of `config`; `view_pad_mode` is the padding of its test-time views' crops, which should be the
    training crop's (a checkpoint's data.pad_mode), so the views look like what the ssl head was trained on."""
    if config.name == "rotation":
        return RotationTask(config.rotation_mode, view_pad_mode)
    if config.name == "masked":
        return MaskedTask(config.mask_ratio, config.patch_size, view_pad_mode, config.norm_targets)
    raise TTAError(f"unknown task {config.name!r}; choose one of: {', '.join(TASKS)}")


__all__ = ["TASKS", "MaskedTask", "RotationTask", "build_task"]
