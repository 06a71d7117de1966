"""madx_fast's version: the one place it is written (pyproject.toml reads it from here, the package and the
files madx_fast writes take it from here)."""
__version__ = "0.1.0"
