"""A check module that fails while it is imported, as a module with a bug at import time does."""

raise RuntimeError("this module is broken")
