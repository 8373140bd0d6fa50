"""Build script of amdim-kernels.

`pip install .` installs the Python package (the reference and Triton backends).
"""
from setuptools import find_packages, setup

setup(
    name="amdim-kernels",
    version="0.1.0",
    description="Fused GPU kernels for the contrastive NCE loss of AMDIM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["amdim_kernels", "amdim_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.2"]},
)
