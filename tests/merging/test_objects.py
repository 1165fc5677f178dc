"""The one "module:attribute" loader (merging.objects), shared by recipes' model factories, suites and the CLI:
what it loads, and a one-line BasinError naming where the name came from for everything it cannot."""

from __future__ import annotations

import math

import pytest

from merging.objects import exec_file, load_object
from taxonomy.errors import BasinError


def test_module_attribute_and_a_python_file(tmp_path):
    assert load_object("math:sqrt") is math.sqrt
    assert load_object("merging.objects:load_object") is load_object
    f = tmp_path / "factory.py"
    f.write_text("def make():\n    return 42\n")
    assert load_object(f"{f}:make", files=True)() == 42
    module = exec_file(f, "basin_user_suite_factory")
    assert module.__name__ == "basin_user_suite_factory" and module.make() == 42


@pytest.mark.parametrize("spec, files, message", [
    ("math.sqrt", False, r"where: expected 'module:attribute', got 'math.sqrt'"),
    (":sqrt", True, r"where: expected 'module:attribute' or 'file.py:attribute', got ':sqrt'"),
    ("math:", False, r"where: expected 'module:attribute'"),
    ("no_such_module_xyz:f", False, r"where: cannot import module 'no_such_module_xyz' \(No module named"),
    (".relative:f", False, r"where: cannot import module '.relative'"),
    ("math:no_such_fn", False, r"where: module 'math' has no attribute 'no_such_fn'"),
    ("missing_dir/f.py:make", True, r"where: no such file missing_dir/f.py"),
])
def test_what_cannot_be_loaded_is_a_one_line_error(spec, files, message):
    with pytest.raises(BasinError, match=message) as err:
        load_object(spec, "where", files=files)
    assert "\n" not in str(err.value)


def test_a_file_is_run_only_where_the_user_typed_its_name(tmp_path):
    f = tmp_path / "evil.py"
    f.write_text("import pathlib\npathlib.Path(__file__).with_name('ran').touch()\ndef make():\n    return 1\n")
    with pytest.raises(BasinError, match="cannot import module"):
        load_object(f"{f}:make")  # a recipe's or a suite's name: modules only
    assert not (tmp_path / "ran").exists()
    assert load_object(f"{f}:make", files=True)() == 1 and (tmp_path / "ran").exists()


def test_the_default_label_is_the_spec_and_callables_pass_through_the_alignment_loader():
    from merging.alignment.checkpoints import _load_object

    with pytest.raises(BasinError, match=r"^'math:nope': module 'math' has no attribute 'nope'$"):
        load_object("math:nope")
    assert _load_object(len) is len and _load_object("math:floor") is math.floor
    with pytest.raises(BasinError, match="expected 'module:attribute'"):
        _load_object("tiny_mlp")
