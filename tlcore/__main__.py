"""`python -m tlcore`: see `tlcore.cli`."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

from tlcore.cli import main, quiet_native_startup_logs  # noqa: E402

if __name__ == "__main__":
    restore = quiet_native_startup_logs()
    try:
        code = main()
    finally:
        restore()
    sys.exit(code)
