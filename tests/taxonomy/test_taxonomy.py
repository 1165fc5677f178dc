import subprocess
import sys

import pytest

import taxonomy
from taxonomy import BasinError, Family


def test_taxonomy_imports_no_torch():
    code = "import sys, taxonomy; taxonomy.all_methods(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_method_has_family_paper_and_year():
    methods = taxonomy.all_methods()
    assert methods
    for m in methods:
        assert isinstance(m.family, Family)
        assert m.paper and 1990 < m.year < 2030, m.name


def test_unknown_method_is_a_clear_error():
    with pytest.raises(BasinError, match="unknown merge method 'tiez'"):
        taxonomy.get("tiez")


def test_every_tensorwise_entry_has_an_implementation():
    from merging.methods.catalog import registered_names
    from taxonomy import Kind

    implemented = set(registered_names())
    declared = {m.name for m in taxonomy.all_methods() if m.kind == Kind.TENSORWISE}
    assert declared == implemented


def test_param_range_check_names_the_field():
    p = taxonomy.Param("density", 1.0, "kept fraction", low=0.0, high=1.0, low_open=True)
    p.check(0.5, "models[0]")
    with pytest.raises(BasinError, match=r"models\[0\].*density"):
        p.check(0.0, "models[0]")
    with pytest.raises(BasinError, match="density"):
        p.check(1.5, "models[0]")


def test_cli_methods_lists_table():
    out = subprocess.run([sys.executable, "-m", "evaluations.cli", "methods"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "linear" in out.stdout and "interpolation" in out.stdout
