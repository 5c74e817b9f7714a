"""``python -m reglab ...`` is the ``reglab`` command."""

from reglab.cli import main

main()
