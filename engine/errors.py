"""The engine's own exceptions, in a module that imports nothing of the engine (so any module may raise them)."""


class ModelNotFoundError(ValueError):
    """A model spec could not be turned into a usable local directory; the message says what to do."""


class ModelPathNotFoundError(ModelNotFoundError, FileNotFoundError):
    """A path-like model spec names a path that does not exist."""
