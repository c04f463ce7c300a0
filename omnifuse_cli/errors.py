"""The errors omnifuse raises for problems a user can fix.

The CLI turns each into one line on stderr plus a hint and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class OmnifuseError(Exception):
    """A problem with the user's input or environment, explained in words they can act on."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ManifestError(OmnifuseError):
    """The manifest (or a file it points to) cannot be read as the documented format."""


class DataError(OmnifuseError):
    """The data can be read but cannot be used as asked (too few patients, bad labels, ...)."""


class ConfigError(OmnifuseError):
    """An option value or combination of options is invalid."""


class BundleError(OmnifuseError):
    """A run directory or model bundle is missing, incompatible or corrupted."""


class WeightsError(OmnifuseError):
    """Pretrained weights were asked for but cannot be had (offline, wrong file, wrong shape)."""


class TrainingDiverged(OmnifuseError):
    """The loss or the predictions became NaN or infinite: these settings do not train."""


class TrainingInterrupted(OmnifuseError):
    """Ctrl-C during training: the run directory holds everything up to the last full epoch."""

    exit_code = 130
