"""Domain errors. Each message names the file, shard or field and what is wrong."""

from __future__ import annotations


class CnnFeaturesError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInput(CnnFeaturesError):
    """An input file cannot be used: bad name, layout, or location."""


class InvalidSpectrogram(InvalidInput):
    """An input file is not a usable 2-D float spectrogram."""


class InvalidConf(CnnFeaturesError):
    """A run conf field is missing or wrong; the message names the field."""


class ModelError(CnnFeaturesError):
    """A feature model is missing, unreadable, unsafe or of the wrong shape."""


class ModelMismatch(ModelError):
    """The model a worker loaded is not the one the plan checked."""


class ShardFailed(CnnFeaturesError):
    """A shard could not be extracted on any device."""


class OutputConflict(CnnFeaturesError):
    """An output folder holds features of another model, or is in use."""


class VerificationFailed(CnnFeaturesError):
    """Features are missing or invalid; the message lists every problem."""


class StoreError(CnnFeaturesError):
    """A store could not be read or written (S3 unreachable, keys refused); names what and where, never a secret."""


class StoreMissing(StoreError):
    """An object or bucket asked for is not there."""


class PlanMismatch(CnnFeaturesError):
    """A shard plan file is missing, or its bytes are not the plan a shard was given; names the file and both digests."""
