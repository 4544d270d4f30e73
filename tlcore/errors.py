"""Every error a user can see, under one base class.

A `TransferLabError`'s message is a plain sentence that says what happened and what to do;
the CLI prints it as it is, a worker records it as the run's error, and pages show it. Any
other exception is a bug, shown with its type name. Keras-free and import-light: every
module may raise these.

Each class also derives from the built-in its callers used to catch (`ValueError`,
`KeyError`, `RuntimeError`, `OSError`), so `except ValueError` keeps working.
"""

from __future__ import annotations


class TransferLabError(Exception):
    """Base of every user-facing error: the message is a plain sentence with the fix."""

    def __str__(self) -> str:
        # KeyError quotes its message; a sentence should read as one everywhere.
        return str(self.args[0]) if self.args else type(self).__name__


class InvalidInput(TransferLabError, ValueError):
    """An argument, a setting or a recipe value that cannot be used as given."""


class NotFound(TransferLabError, KeyError):
    """No dataset, run, backbone or file by that name; the message lists what exists."""


class DatasetImportError(InvalidInput):
    """Nothing usable remains (or the source is not importable). `report` holds what was seen."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class ImageRejected(InvalidInput):
    """A file that is not a usable image. `reason` is a short code, `message` a plain sentence.

    Reasons: `empty`, `not_image`, `corrupt`, `too_small`, `too_large`, `unreadable`
    (and, from the importer, `duplicate`, `label_conflict`, ...).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.reason, self.message))


class UnsafeArchive(InvalidInput):
    """A zip that cannot be extracted safely. `reason` is a short code, the message a sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class SourceNotAllowed(InvalidInput):
    """A server folder outside the configured data roots."""


class ModelLoadError(InvalidInput):
    """A saved model that cannot (or must not) be loaded."""


class WeightsUnavailable(TransferLabError, RuntimeError):
    """Pretrained weights that are neither cached nor downloadable from here."""


class DatasetDownloadError(TransferLabError, RuntimeError):
    """A catalog dataset that could not be downloaded."""


class WorkerBusy(TransferLabError, RuntimeError):
    """Another worker already serves this data home."""


class TransitionRefused(TransferLabError, RuntimeError):
    """A run's status change the store does not allow (a finished run never changes status again)."""


class RunCancelled(TransferLabError):
    """The run was asked to stop; raised between batches."""


class SaveFailed(TransferLabError, OSError):
    """A file could not be written (a full disk, say); the previous version is kept."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def plain_message(exc: BaseException) -> str:
    """One line for `exc`: its sentence when it is a `TransferLabError`, else `Type: message`."""
    text = " ".join(str(exc).split())
    if isinstance(exc, TransferLabError):
        return text or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
