"""basin.merging: checkpoints in and out, the streaming merge engine, recipes and merge methods."""

from taxonomy.errors import BasinError

__all__ = ["BasinError"]
