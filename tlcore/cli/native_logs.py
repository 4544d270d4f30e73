"""Filtering TensorFlow's native start-up lines out of stderr, for `python -m tlcore`."""

from __future__ import annotations

import os
import re
import sys
import threading

# TensorFlow's C++ start-up lines ("oneDNN custom operations are on", "Could not find cuda
# drivers", "failed call to cuInit") are written before absl logging is set up, so
# TF_CPP_MIN_LOG_LEVEL cannot silence them. Known ones are dropped; every other line passes.
_NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IWE]\d{4} [\d:.]+ +\d+ (port|cudart_stub|cuda_platform|cuda_executor|cpu_feature_guard|gpu_device)\.cc:\d+\]"
    r"|To enable the following instructions:)")


def quiet_native_startup_logs():
    """Filter known TensorFlow start-up noise out of file descriptor 2; returns a restore function."""
    if os.environ.get("TLCORE_DEBUG"):
        return lambda: None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
    except OSError:
        return lambda: None

    def pump():
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not _NATIVE_NOISE.match(line.decode("utf-8", "replace")):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore():
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees EOF
        thread.join(timeout=2)

    return restore
