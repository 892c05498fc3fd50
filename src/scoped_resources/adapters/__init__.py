"""Adapters: ready resources for real clients, one module per technology.

Each module is imported on its own (``from scoped_resources.adapters import
postgres``) and needs its extra (``pip install 'scoped-resources[postgres]'``);
importing this package imports no driver.
"""
