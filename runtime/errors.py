"""User-facing errors. Each says what is wrong and what to do; the CLI maps them to exit 2."""


class VispecError(Exception):
    """Bad input or artifacts: a message a user can act on (what, what was expected, hint)."""


class ModelDirError(VispecError):
    """The model directory is missing, incomplete or of an unsupported architecture."""


class ManifestError(VispecError):
    """An artifact directory's manifest is missing, corrupt or does not match."""


class ShapeError(VispecError):
    """An input is outside a graph's spec (dtype, rank, or a dim outside its profile)."""


class PromptTooLongError(VispecError):
    """The prompt (plus the tokens to generate) does not fit the cache's max_len."""
