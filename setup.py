"""Package layout (all other metadata is in pyproject.toml).

kernels/ and data_prep/ are top-level folders of the repository but install inside the project's
namespace, as sessa_scale.kernels and sessa_scale.data_prep: top-level `kernels` and `data_prep`
would collide with other distributions of those names. Packages are found at build time, so a build
from the metadata alone (the Docker image's dependency layer) installs no code and needs no source
folder. Run from a checkout without installing, sessa_scale/__init__.py maps the same two names.
"""

from pathlib import Path

from setuptools import find_packages, setup

# import name -> folder of the repository
PACKAGE_DIRS = {"sessa_scale": "sessa_scale", "sessa_scale.kernels": "kernels", "sessa_scale.data_prep": "data_prep"}

setup(
    package_dir={name: folder for name, folder in PACKAGE_DIRS.items() if name != "sessa_scale"},
    packages=[
        package
        for name, folder in PACKAGE_DIRS.items()
        if (Path(folder) / "__init__.py").is_file()
        for package in [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    ],
)
