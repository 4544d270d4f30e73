"""Where training runs (GPUs or the CPU, one replica or several), with which speed-ups, and
how every other process keeps its hands off the worker's GPUs.

`plan` decides, `apply` sets the dtype policy and returns the distribution strategy. The
rule for the "auto" switches lives in `plan`. No GPU has ever run this code (the project's
machines have none); the multi-replica path is tested over logical CPU devices.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from tlcore.errors import InvalidInput
from tlcore.records.config import check_switch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Comma list of devices to train on, e.g. "/gpu:0,/gpu:1" (default: every visible GPU, else the CPU).
TRAIN_DEVICES_ENV = "TLCORE_TRAIN_DEVICES"
# The dashboard process: "cpu" (no GPU at all) or "gpu:N" (that one GPU, capped); default "gpu:0".
UI_DEVICE_ENV = "TLCORE_UI_DEVICE"
UI_GPU_MEMORY_ENV = "TLCORE_UI_GPU_MEMORY_MB"
UI_GPU_MEMORY_MB = 2048  # enough for a few loaded classifiers at 224 px; the rest stays the worker's

# Every process that may touch a GPU declares its role once, at its start (`declare_process`):
# training processes take memory as they need it on every GPU; every other process takes at
# most one GPU, capped by the two variables above (named for the dashboard, the first of them).
TRAINING_ROLES = ("worker", "ray_task")
SIDE_ROLES = ("dashboard", "serve", "cli")
_declared_roles: list[str] = []
_policy: str | None = None


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    kind: str  # "GPU" or "CPU"
    devices: list[str]  # one entry per replica; empty: the host CPU as one replica
    mixed_precision: bool
    xla: bool
    strategy_name: str  # "MirroredStrategy", "OneDevice" or "default (CPU)"

    @property
    def replicas(self) -> int:
        return max(1, len(self.devices))

    def describe(self) -> str:
        extras = [name for name, on in (("mixed precision", self.mixed_precision), ("XLA", self.xla)) if on]
        return (f"{self.kind}: {', '.join(self.devices) or 'host CPU'}; strategy {self.strategy_name}"
                + (f"; {' and '.join(extras)} on" if extras else "; mixed precision and XLA off"))


def gpus() -> list[str]:
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def enable_memory_growth() -> None:
    """Let this process take GPU memory as it needs it instead of all of it at start."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth can no longer be changed
            pass
        except ValueError:  # a virtual-device memory cap is set (`declare_process`): the cap rules
            pass


def train_devices() -> list[str]:
    """The devices training places replicas on: `$TLCORE_TRAIN_DEVICES`, else every visible GPU."""
    chosen = os.environ.get(TRAIN_DEVICES_ENV, "").strip()
    if chosen:
        return [d.strip() for d in chosen.split(",") if d.strip()]
    return [f"/gpu:{i}" for i in range(len(gpus()))]


def plan(mixed_precision: str = "auto", xla: str = "auto") -> DevicePlan:
    """Choose the devices and the speed-ups for training.

    The rule for "auto":
    - one GPU: mixed precision and XLA on;
    - several replicas: mixed precision on, XLA off. Keras itself turns XLA off under
      tf.distribute strategies (`Trainer._resolve_auto_jit_compile`): forced on, `fit` fails;
    - CPU: both off (float16 on a CPU is emulated and slow; XLA gains little there).
    "on" and "off" force a switch, so mixed precision can be tested on a CPU.

    Raises:
        InvalidInput: a switch is not auto/on/off, or XLA is forced on over several replicas.
    """
    check_switch("mixed_precision", mixed_precision)
    check_switch("xla", xla)
    found = train_devices()
    on_gpu = any("gpu" in d.lower() for d in found)
    several = len(found) > 1
    if xla == "on" and several:
        raise InvalidInput(f"XLA cannot run with {len(found)} replicas: Keras turns it off under "
                           "MirroredStrategy and forcing it fails in training. Use --xla auto or off, or train "
                           f"on one device ({TRAIN_DEVICES_ENV}=/gpu:0).")
    use_mp = on_gpu if mixed_precision == "auto" else mixed_precision == "on"
    use_xla = (on_gpu and not several) if xla == "auto" else xla == "on"
    if several:
        strategy = "MirroredStrategy"
    elif found:  # one GPU, or one device named in $TLCORE_TRAIN_DEVICES: placed there
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
        return _mirrored_strategy(tuple(device_plan.devices))
    if device_plan.strategy_name == "OneDevice":
        return tf.distribute.OneDeviceStrategy(device_plan.devices[0])
    return tf.distribute.get_strategy()


@functools.cache
def _mirrored_strategy(device_names: tuple[str, ...]):
    # One strategy per device set for the life of the process: each new MirroredStrategy
    # numbers its collective ops from the same first key, and the runtime remembers a key's
    # tensor shape, so a worker's second run on a fresh strategy fails with "Shape mismatch
    # in the collective instance".
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(device_names))


def float32_model(model):
    """`model` rebuilt with every layer computing in float32, sharing nothing, same weights.

    Keras saves each layer's dtype policy: a model built under mixed_float16 would reload as
    float16 everywhere (slow on a CPU, refused by the TFLite converter). Returns `model`
    itself when no layer is mixed.
    """
    config = model.get_config()
    if not _has_mixed_policy(config):
        return model
    twin = model.__class__.from_config(_float32_policies(config))
    twin.set_weights(model.get_weights())
    return twin


def _has_mixed_policy(config) -> bool:
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and str(config["config"]["name"]).startswith("mixed"):
            return True
        return any(_has_mixed_policy(v) for v in config.values())
    if isinstance(config, list):
        return any(_has_mixed_policy(v) for v in config)
    return False


def _float32_policies(config):
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {k: _float32_policies(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_policies(v) for v in config]
    return config


def ui_device(environ: dict[str, str] | None = None) -> tuple[int | None, int]:
    """(GPU index or None for the CPU, memory cap in MB) the dashboard process may use.

    `$TLCORE_UI_DEVICE`: "cpu" (no GPU) or "gpu:N" (default gpu:0); `$TLCORE_UI_GPU_MEMORY_MB`
    the cap (default 2048).

    Raises:
        InvalidInput: the variables do not parse.
    """
    environ = os.environ if environ is None else environ
    choice = environ.get(UI_DEVICE_ENV, "gpu:0").strip().lower()
    memory = environ.get(UI_GPU_MEMORY_ENV, str(UI_GPU_MEMORY_MB)).strip()
    if not memory.isdigit() or int(memory) < 64:
        raise InvalidInput(f"`{UI_GPU_MEMORY_ENV}` must be a whole number of MB, at least 64. Received: {memory!r}")
    if choice == "cpu":
        return None, int(memory)
    index = choice.removeprefix("gpu:")
    if not index.isdigit():
        raise InvalidInput(f"`{UI_DEVICE_ENV}` must be 'cpu' or 'gpu:N'. Received: {choice!r}")
    return int(index), int(memory)


def declare_process(role: str) -> str:
    """Apply this process's device policy for `role`, once, before TensorFlow touches a GPU.

    "worker" and "ray_task" train: memory growth on every GPU they see. "dashboard", "serve"
    and "cli" (commands that load a model) take at most one GPU with a memory cap, or none
    (`ui_device`); only this process is limited, through TensorFlow (never
    `CUDA_VISIBLE_DEVICES`, which a worker it starts would inherit). Later calls apply nothing
    and return what the first did. Returns what was done, for the log.

    Raises:
        InvalidInput: `role` is unknown, or the side-process variables do not parse.
    """
    global _policy
    if role not in TRAINING_ROLES + SIDE_ROLES:
        raise InvalidInput(f"`role` must be one of {', '.join(TRAINING_ROLES + SIDE_ROLES)}. Received: {role!r}")
    _declared_roles.append(role)
    if _policy is None:
        if role in TRAINING_ROLES:
            enable_memory_growth()
            _policy = f"{role}: memory growth on every visible GPU ({len(gpus())})"
        else:
            _policy = f"{role}: {_cap_side_process()}"
    return _policy


def current_policy() -> str | None:
    """What `declare_process` applied in this process, or None when nothing declared one."""
    return _policy


def declared_roles() -> tuple[str, ...]:
    """The roles `declare_process` was called with in this process, in order (the first was applied)."""
    return tuple(_declared_roles)


def _cap_side_process() -> str:
    import tensorflow as tf

    index, memory = ui_device()
    found = tf.config.list_physical_devices("GPU")
    if not found:
        return "on the CPU (no GPU visible)"
    if index is not None and index >= len(found):
        raise InvalidInput(f"`{UI_DEVICE_ENV}` names GPU {index}, but this machine shows {len(found)} GPU(s). "
                           f"Received: gpu:{index}")
    try:
        if index is None:
            tf.config.set_visible_devices([], "GPU")
            return "on the CPU (GPUs left to the worker)"
        tf.config.set_visible_devices([found[index]], "GPU")
        tf.config.set_logical_device_configuration(
            found[index], [tf.config.LogicalDeviceConfiguration(memory_limit=memory)])
    except RuntimeError:  # TensorFlow already started in this process: too late to limit it
        return "device settings not applied (TensorFlow had already started)"
    return f"on GPU {index}, capped at {memory} MB"


def worker_environment(base: dict[str, str], data_home: str, package_root: str) -> dict[str, str]:
    """The worker's environment, built explicitly from `base` (this process's).

    The dashboard's own device settings (`$TLCORE_UI_DEVICE`, its memory cap) stay behind:
    the dashboard limits itself through TensorFlow, never through `CUDA_VISIBLE_DEVICES`, so
    the worker sees every GPU the server was started with.
    """
    env = {k: v for k, v in base.items() if k not in (UI_DEVICE_ENV, UI_GPU_MEMORY_ENV)}
    env.update(TLCORE_HOME=data_home, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, base.get("PYTHONPATH")) if p)
    return env


def describe() -> dict:
    """The device facts the dashboard and `backbones --json` show."""
    device_plan = plan()
    return {**dataclasses.asdict(device_plan), "replicas": device_plan.replicas, "summary": device_plan.describe()}
