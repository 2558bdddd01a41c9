"""Package discovery that pyproject.toml cannot express: the kernels/ folder installs under the
import name `dms_kernels`, because Hugging Face publishes a `kernels` distribution that
transformers imports, and a top-level `kernels` of ours would shadow it."""
from setuptools import find_packages, setup

kernel_pkgs = ["dms_kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]
setup(
    packages=find_packages(include=["dms", "dms.*"]) + kernel_pkgs,
    package_dir={"dms_kernels": "kernels"},
)
