"""Build hook for the native kernels (see kernels/native). Metadata lives in pyproject.toml."""

from setuptools import setup

setup()
