"""The release's version (pyproject.toml's), on the ground floor: the API and the CLI print it, and
the package's face hands it on as sloth_serve.__version__."""

__version__ = "0.1.0"
