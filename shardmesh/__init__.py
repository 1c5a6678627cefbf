"""shardmesh: one LLM service from many ordinary machines."""

__version__ = "0.1.0"
