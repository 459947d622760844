"""imp's version: a module of its own at the bottom of the house, so that the modules which record
it (the store, the pair-check memo) need not import the package and its API."""

__version__ = "0.1.0"
