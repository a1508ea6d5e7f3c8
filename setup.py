"""Package discovery that pyproject.toml alone cannot express.

Every package under ``devlayer/`` is found automatically (a new subpackage cannot be left out
of the wheel by a hand-kept list), and the top-level ``backends/`` folder installs as
``devlayer.backends`` (the ``package-dir`` mapping in pyproject.toml). All other metadata
lives in pyproject.toml; tests/unit/test_packaging.py checks the built wheel and sdist.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["devlayer", "devlayer.*"]), "devlayer.backends"])
