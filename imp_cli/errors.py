"""The one exception type for problems a user can act on: the CLI prints it as one line, exit 1."""


class ImpError(Exception):
    pass
