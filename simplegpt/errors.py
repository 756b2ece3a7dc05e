"""Exceptions the CLI turns into one clear line and a non-zero exit."""


class SimpleGPTError(Exception):
    """Base class for errors whose message is meant for the user as it is."""


class CheckpointError(SimpleGPTError, ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or incompatible."""


class ConfigError(SimpleGPTError, ValueError):
    """A configuration file or command-line override is invalid."""


class DataError(SimpleGPTError, ValueError):
    """A corpus or dataset is missing, empty or unusable."""
