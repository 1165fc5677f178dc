"""The one lazy matplotlib import: Agg pyplot when installed; without it a clear error (a BasinError and an
ImportError), and the plots documented as skipped return None / [] instead of drawing."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from evaluations.plotting import MatplotlibMissing, optional_pyplot, pyplot
from taxonomy.errors import BasinError


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib made unimportable for the test (None in sys.modules makes `import` raise ImportError)."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _path_result():
    from evaluations.landscape import PathResult

    return PathResult(alphas=np.linspace(0, 1, 5), loss=np.array([0.0, 2.0, 1.0, 1.0, 0.0]), accuracy=np.ones(5))


def _bench_result():
    from evaluations.bench.harness import BenchmarkResult, Row

    rows = [Row("base", "reference", {"a": 0.5, "b": 0.7}), Row("ties", "merge", {"a": 0.8, "b": 0.6})]
    return BenchmarkResult("toy", ["a", "b"], rows, {}, 0, "serial", 0.0, 0)


def test_without_matplotlib_a_clear_error_or_a_skipped_plot(no_matplotlib, tmp_path):
    from evaluations.bench.plots import save_plots
    from evaluations.landscape.plots import plot_path

    with pytest.raises(MatplotlibMissing, match=r"plotting needs matplotlib.*pip install 'basin\[plot\]'") as err:
        pyplot()
    assert isinstance(err.value, BasinError) and isinstance(err.value, ImportError)
    assert "\n" not in str(err.value)
    assert optional_pyplot() is None
    assert plot_path(_path_result(), tmp_path / "p.png") is None
    assert save_plots(_bench_result(), tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_with_matplotlib_agg_pyplot_and_files(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    from evaluations.bench.plots import save_plots
    from evaluations.landscape.plots import plot_path

    plt = pyplot()
    assert plt is optional_pyplot() and plt.__name__ == "matplotlib.pyplot"
    assert matplotlib.get_backend().lower() == "agg"
    out = plot_path(_path_result(), tmp_path / "p.png", title="toy")
    assert out and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_plots(_bench_result(), tmp_path, stem="b") == [tmp_path / "b.png"]
    assert (tmp_path / "b.png").stat().st_size > 0
