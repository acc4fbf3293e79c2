"""The Hydra config tree, shipped inside the package (``pkg://distillery.conf``)."""
