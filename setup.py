"""Packaging.

Native code is not compiled here: iwm_kernels builds csrc/ just in time on first use
(torch.utils.cpp_extension + ninja, cached per source hash), so installing never needs torch inside
an isolated build environment (which would download a multi-GB CUDA build). csrc/ also ships inside
the package as `iwm_kernels.csrc`, so a non-editable install can still build it.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["iwm_kernels*", "iwm*", "benchmarks*"]) + ["iwm_kernels.csrc"],
    package_dir={"iwm_kernels.csrc": "csrc"},
    package_data={"iwm_kernels.csrc": ["*.cpp", "*.h", "cuda/*.cu", "cuda/*.h"]},
    include_package_data=False,
)
