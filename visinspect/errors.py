"""User-facing errors: the CLI prints them as one line, without a traceback."""


class VisinspectError(Exception):
    """A problem with the user's input (path, file, value) that the message explains how to fix."""


class DataError(VisinspectError, ValueError):
    """A data folder, image or mask that is missing, malformed or inconsistent."""


class CheckpointError(VisinspectError, ValueError):
    """A checkpoint file that cannot be loaded as what was asked for."""


class ConfigError(VisinspectError, ValueError):
    """A setting out of range (threshold, image size, fraction) or an inconsistent combination."""
