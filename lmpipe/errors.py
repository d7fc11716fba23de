"""The errors lmpipe raises on bad input, and the one table of exit codes.

The CLI prints an error's message and exits with its code, so a scheduler (Airflow) can tell
bad input, which a retry cannot fix, from a crash, which it might.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    CONFIG = 2
    NAN_ABORT = 3
    REFUSED = 4
    CHECKS_FAILED = 5
    INTERRUPTED = 130


# What each code means, for ``lmpipe --help`` and the docs (docs/concepts.md is generated from it).
EXIT_CODES: dict[ExitCode, str] = {
    ExitCode.OK: "success (for `promote`: the candidate was promoted)",
    ExitCode.ERROR: "an error that names its cause: a missing corpus or manifest, unreachable storage, a corrupt "
                    "checkpoint, a failed rank",
    ExitCode.CONFIG: "bad configuration: an unknown key, a wrong type, a malformed override or command line, or two "
                     "settings that contradict each other; retrying cannot help",
    ExitCode.NAN_ABORT: "`train` stopped after `nan_abort_after` consecutive non-finite losses",
    ExitCode.REFUSED: "`promote` refused the candidate (the reasons are printed); the champion is unchanged",
    ExitCode.CHECKS_FAILED: "`check-data`: at least one expectation failed (the summary names each one)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


class LmpipeError(Exception):
    """Base class: a problem with the user's input or environment, with a message that names it."""

    exit_code = ExitCode.ERROR


class ConfigError(LmpipeError):
    """An unknown config key, a wrong type, a malformed override, or contradicting settings."""

    exit_code = ExitCode.CONFIG


class StorageError(LmpipeError):
    """Object storage could not be reached, refused us, or a key was unsafe."""


class UnsafeKeyError(StorageError):
    """An object key that could escape its prefix (``..``, absolute path)."""


class CorpusError(LmpipeError):
    """The corpus is missing, unreadable, or has no usable document."""


class ManifestError(LmpipeError):
    """A shard set has no manifest, or its manifest is invalid."""
