"""`basin search`: tune a recipe's weights, densities, `t` values and method with Optuna, locally or on Ray.

`merging.recipe.search_space` reads the `{search: ...}` settings (no Optuna); `trials` merges and scores one trial;
`study` is the Optuna side; `executors` runs trials locally or on Ray actors; `report` writes the results;
`driver.run_search` joins them.
"""

from evaluations.search.driver import SearchOptions, SearchResult, run_search
from evaluations.search.trials import DataSpec, ObjectiveSpec

__all__ = ["DataSpec", "ObjectiveSpec", "SearchOptions", "SearchResult", "run_search"]
