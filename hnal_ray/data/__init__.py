"""Real image-text data sets built offline from packages on PyPI."""
