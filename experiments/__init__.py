"""Built-in experiments: ``shapes`` (generated), ``omniglot``, ``face`` and ``fingerprint``."""
