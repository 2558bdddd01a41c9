"""Package discovery that pyproject.toml cannot express: folders installed under other import names.

- kernels/ -> `dms_kernels`: Hugging Face publishes a `kernels` distribution that transformers imports,
  and a top-level `kernels` of ours would shadow it.
- train/ -> `dms_train`, scripts/ -> `dms_scripts`: so the console commands (dms-retrofit, dms-generate,
  ...) run the same files as `python train/retrofit.py`, without claiming generic top-level names.
"""
from setuptools import find_packages, setup

MAPPED = {"kernels": "dms_kernels", "train": "dms_train", "scripts": "dms_scripts"}
packages = find_packages(include=["dms", "dms.*"])
for folder, name in MAPPED.items():
    packages += [name + p[len(folder):] for p in find_packages(include=[folder, folder + ".*"])]
setup(packages=packages, package_dir={name: folder for folder, name in MAPPED.items()})
