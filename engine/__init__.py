"""A performance-first LLM pretraining engine.

Importing `engine` starts no process group and touches no GPU: subpackages load on first use.
"""

__version__ = "0.1.0"
