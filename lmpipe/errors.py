"""The errors lmpipe raises on bad input. The CLI prints their message and exits non-zero."""


class LmpipeError(Exception):
    """Base class: a problem with the user's input or environment, with a message that names it."""

    exit_code = 1


class ConfigError(LmpipeError):
    """An unknown config key, a wrong type, or a malformed override."""

    exit_code = 2


class StorageError(LmpipeError):
    """Object storage could not be reached, refused us, or a key was unsafe."""


class UnsafeKeyError(StorageError):
    """An object key that could escape its prefix (``..``, absolute path)."""


class CorpusError(LmpipeError):
    """The corpus is missing, unreadable, or has no usable document."""


class ManifestError(LmpipeError):
    """A shard set has no manifest, or its manifest is invalid."""
