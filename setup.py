"""Installs the repository's top-level folders under one import name, ``reglab``.

The folders keep their names in the repository (``lightning_app/``, ``callbacks/``,
``datamodules/``); installed, they are ``reglab``, ``reglab.callbacks`` and ``reglab.datamodules``,
so nothing reglab installs can collide with a user's own ``callbacks.py`` or ``datamodules/``.
Subpackages are discovered, so a new family folder needs no entry here.
"""

from setuptools import find_packages, setup

FOLDERS = {"reglab": "lightning_app", "reglab.callbacks": "callbacks", "reglab.datamodules": "datamodules"}

packages = [name for name in FOLDERS]
for name, folder in FOLDERS.items():
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=FOLDERS,
    # technique cards ship beside their modules (the registry reads them at run time)
    package_data={name: ["**/*.card.yaml", "*.card.yaml"] for name in FOLDERS},
)
