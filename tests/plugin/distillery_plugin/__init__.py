"""A user's plugin package, kept outside ``src/``: a stage, an encoder, a loss and a data source
that distillery uses through ``_target_`` and a user config dir (``--config-dir``)."""
