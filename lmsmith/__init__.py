"""lmsmith: build, adapt, compress, check, explain and serve language models."""
__version__ = "0.1.0"
