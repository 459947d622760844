"""imp: run Imp vision-language models locally through llama.cpp.

The Python API (see the README's "Python" section)::

    import imp_cli
    with imp_cli.load("imp-v1-3b") as model:
        print(model.ask("photo.jpg", "What is in the picture?"))

`load`, `Model`, `Chat`, `Choice` and `TextStream` come from imp_cli.api, imported on first use
so that `import imp_cli` (and so every `imp` command) stays light. Every error a caller can act on
is an `ImpError` (imp_cli.errors) with the CLI's one-line message.
"""

from .errors import ImpError

TYPE_CHECKING = False  # not typing's: `import imp_cli` (every `imp` command) imports nothing more

from .version import __version__
__all__ = ["load", "Model", "Chat", "Choice", "TextStream", "ImpError", "ArgumentError", "ImageInput"]

_API = {"load", "Model", "Chat", "Choice", "TextStream", "ArgumentError", "ImageInput"}

if TYPE_CHECKING:
    from .api import ArgumentError, Chat, Choice, ImageInput, Model, TextStream, load


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'imp_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
