"""Packages: flmjax/ and, installed as `flmjax.kernels`, the top-level kernels/ folder (the Pallas
kernels beside their references). Everything else about the package is in setup.cfg."""

from setuptools import find_packages, setup

setup(
  packages=find_packages(include=['flmjax', 'flmjax.*']) + ['flmjax.kernels'],
  package_dir={'flmjax.kernels': 'kernels'},
)
