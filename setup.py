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
    # the cards ship beside their modules (reglab.registry reads them at run time); the recursive
    # glob of reglab.callbacks also takes the planned rows' cards in family folders that are not
    # packages yet, so an installed registry lists every row of the board
    package_data={"reglab.callbacks": ["**/*.card.yaml"]},
)
