"""imp: run Imp vision-language models locally through llama.cpp."""

__version__ = "0.1.0"
