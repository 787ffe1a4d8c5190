"""Typed errors: each says what went wrong and which setting or file to look at.

Recoverable and fatal conditions are separate classes so that a controller can decide without parsing
messages. Every class takes only its message as a constructor argument, so instances pickle across Ray
actors unchanged.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of ``python -m trainer``; scripts and schedulers can branch on them."""

    FINISHED = 0
    FAILED = 1
    CONFIG_ERROR = 2
    ABORTED = 3
    #: The user's training code raised (a hook of trainer.api.Task): not retried, not handed over.
    USER_ERROR = 4
    #: Stopped by SIGTERM/SIGINT after saving the step in flight; re-running the command resumes there.
    PREEMPTED = 5


class TrainerError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """A configuration value is missing or not allowed. Raised before anything starts."""


class DeviceError(TrainerError):
    """Base class of device-family problems."""


class UnknownDeviceFamilyError(DeviceError, ConfigError):
    """The configured device family is not registered."""


class DeviceUnavailableError(DeviceError):
    """The family is registered but cannot be used on this machine (driver, package or device missing)."""


class ClusterUnreachableError(TrainerError):
    """The configured Ray cluster cannot be reached, or never grants the resources asked for."""


class CheckpointError(TrainerError):
    """Base class of checkpoint problems."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's files do not match its manifest (checksum, size, missing file, bad JSON).

    Recoverable: the loader skips it and falls back to the previous committed checkpoint.
    """


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, I/O error). Nothing was committed; the previous
    checkpoint is untouched, and training may go on."""


class CheckpointIncompatibleError(CheckpointError):
    """A checkpoint is intact but does not fit the model or optimizer being restored (keys or shapes).

    Fatal: falling back to an older checkpoint of the same run would not help.
    """


class UnsafeCheckpointError(CheckpointCorruptError):
    """A checkpoint file asks to unpickle something other than plain checkpoint metadata. Never loaded."""


class NoCheckpointError(CheckpointError):
    """No committed checkpoint could be loaded from the directory."""


class UserCodeError(TrainerError):
    """The user's code (a hook of ``trainer.api.Task``) raised. Fatal: retrying or moving to another family
    would raise it again, so the run stops at once with :attr:`ExitCode.USER_ERROR`. The message holds the
    hook, the step, the rank and the user's traceback."""
