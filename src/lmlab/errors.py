"""The few error types the CLI turns into one clear line and exit status 2.

Every message names the file, line or parameter at fault and what was expected, so that a user
can fix the input without reading a traceback.
"""


class LmlabError(Exception):
    """Base class: a problem with the user's input, not a bug in lmlab."""


class ConfigError(LmlabError, ValueError):
    """An unknown, missing or out-of-range configuration key, CLI flag or argument."""


class DataError(LmlabError, ValueError):
    """A data file that is missing, empty, not UTF-8, or malformed (names file and line)."""


class CheckpointError(LmlabError):
    """A model directory or checkpoint that cannot be loaded (names the file and the problem)."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after checkpointing (not an error: the CLI reports
    it in one line and exits with 128 + `signum`)."""

    def __init__(self, message: str, *, signum: int, step: int, checkpoint: str):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
