"""The one exception type the converter raises for problems a user can act on."""


class ConvertError(Exception):
    """A one-line, user-facing reason why a checkpoint cannot be converted."""
