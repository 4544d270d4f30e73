"""Where training runs: GPU(s) with mixed precision and XLA, or the CPU.

On this project's CI machine there is no GPU, so only the CPU fallback is exercised there;
the GPU branch follows the Keras/TensorFlow guides (mixed_float16, jit_compile,
MirroredStrategy across all visible GPUs).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    kind: str  # "GPU" or "CPU"
    devices: list[str]
    mixed_precision: bool
    xla: bool
    strategy_name: str  # "MirroredStrategy", "OneDevice" or "default (CPU)"

    def describe(self) -> str:
        extras = [name for name, on in (("mixed precision", self.mixed_precision), ("XLA", self.xla)) if on]
        return (f"{self.kind}: {', '.join(self.devices) or 'host CPU'}; strategy {self.strategy_name}"
                + (f"; {' and '.join(extras)} on" if extras else "; mixed precision and XLA off"))


def gpus() -> list[str]:
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def enable_memory_growth() -> None:
    """Let this process take GPU memory as it needs it, so a UI process does not starve the worker."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth can no longer be changed
            pass


def plan(mixed_precision: bool | None = None, xla: bool | None = None) -> DevicePlan:
    """Choose devices and speed-ups; `None` means on when a GPU is present."""
    found = gpus()
    on_gpu = bool(found)
    use_mp = on_gpu if mixed_precision is None else (mixed_precision and on_gpu)
    use_xla = on_gpu if xla is None else xla
    if len(found) > 1:
        strategy = "MirroredStrategy"
    elif on_gpu:
        strategy = "OneDevice"
    else:
        strategy = "default (CPU)"
    return DevicePlan("GPU" if on_gpu else "CPU", found, use_mp, use_xla, strategy)


def apply(device_plan: DevicePlan):
    """Set the global dtype policy and return the distribution strategy for `device_plan`."""
    import keras
    import tensorflow as tf

    enable_memory_growth()
    keras.mixed_precision.set_global_policy("mixed_float16" if device_plan.mixed_precision else "float32")
    if device_plan.strategy_name == "MirroredStrategy":
        return tf.distribute.MirroredStrategy()
    if device_plan.strategy_name == "OneDevice":
        return tf.distribute.OneDeviceStrategy("/gpu:0")
    return tf.distribute.get_strategy()


def describe() -> dict:
    """The device facts the dashboard and `backbones --json` show."""
    device_plan = plan()
    return {**dataclasses.asdict(device_plan), "summary": device_plan.describe()}
