"""Category discovery: the discovery scenario's protocols and commands (the family of ``reglab.callbacks.category_discovery``)."""
