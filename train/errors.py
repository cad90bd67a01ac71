"""The error a user fixes by changing a setting (kept apart so the data modules can raise it without importing
the config module, which imports them)."""


class ConfigError(ValueError):
    """A setting that cannot work with this model, data or machine, found at start: the message says what to
    change. ``python -m train.main`` prints it as one ``error:`` line and exits 2."""
