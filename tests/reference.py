"""The ground truth the tests compare answers with: lives in ``shardmesh.tools.reference``
(the churn soak uses it too)."""

from shardmesh.tools.reference import Reference, Transformers

__all__ = ["Reference", "Transformers"]
