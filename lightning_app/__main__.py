"""``python -m lightning_app ...`` is the ``reglab`` command."""

from lightning_app.cli import main

main()
