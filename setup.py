"""spank-sif: a Slurm SPANK plugin and Python package for encrypted SIF images."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="spank-sif",
    version="0.1.0",
    description="Run encrypted Singularity/Apptainer SIF images under Slurm (SPANK plugin)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["spank_sif", "spank_sif.*"]),
    # cryptography 47: Argon2i (LUKS2 keyslots may use it; Argon2id arrived in 44).
    install_requires=["cffi>=1.15", "cryptography>=47", "pyyaml>=5.1"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "ruff>=0.4", "mypy>=1.8", "atheris>=2.3"]},
    # The SPANK plugin: a cffi-built shared object, spank_sif/_plugin.<ext> (csrc/build_plugin.py).
    cffi_modules=["csrc/build_plugin.py:ffibuilder"],
    entry_points={"console_scripts": ["spank-sif = spank_sif.cli:main"]},
    zip_safe=False,
)
