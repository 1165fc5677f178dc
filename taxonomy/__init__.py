"""basin's taxonomy of merge methods (SoK on model merging through loss-landscape geometry).

Pure data, no torch: `taxonomy.get("ties")`, `taxonomy.all_methods()`, `taxonomy.table()`.
"""

from taxonomy.core import Family, Kind, MethodInfo, Param
from taxonomy.errors import BasinError
from taxonomy.registry import all_methods, get, table

__all__ = ["BasinError", "Family", "Kind", "MethodInfo", "Param", "all_methods", "get", "table"]
