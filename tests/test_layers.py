"""The packages' layering, read from the source: taxonomy <- merging <- evaluations, and inside merging the
pipeline's stages (io <- recipe <- plan <- engine <- output <- pipeline) never import a later stage."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"taxonomy": 0, "merging": 1, "evaluations": 2}
# foundation modules (data and small helpers) first; `methods` is read by the recipe's validation, the plan and
# the engine; alignment and the model-level merges consume opened checkpoints
STAGES = {"architectures": 0, "batches": 0, "dtypes": 0, "modes": 0, "objects": 0, "profiling": 0, "reductions": 0,
          "io": 1,
          "methods": 2, "recipe": 3, "plan": 4, "engine": 5, "merge_stats": 5, "alignment": 5, "output": 6,
          "modelwise": 6, "pipeline": 7, "moe": 7, "tokensurgeon": 7, "extraction": 8, "multistage": 8}
IMPORT = re.compile(r"^\s*(?:from|import)\s+(taxonomy|merging|evaluations)(?:\.(\w+))?", re.MULTILINE)


def _imports(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        for m in IMPORT.finditer(path.read_text()):
            yield path.relative_to(ROOT), m.group(1), m.group(2)


def test_no_package_imports_a_higher_layer():
    bad = [f"{p}: imports {pkg}" for name in PACKAGES for p, pkg, _ in _imports(name)
           if PACKAGES[pkg] > PACKAGES[name]]
    assert not bad, bad


def test_no_merging_stage_imports_a_later_stage():
    bad = []
    for path, pkg, sub in _imports("merging"):
        me = path.parts[1].removesuffix(".py")
        if pkg == "merging" and sub and me != "__init__" and sub != me and STAGES[sub] > STAGES[me]:
            bad.append(f"{path}: imports merging.{sub}")
    assert not bad, bad


def test_every_merging_module_has_a_stage():
    names = {p.name.removesuffix(".py") for p in (ROOT / "merging").iterdir()
             if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith("_")}
    assert names == set(STAGES), names ^ set(STAGES)
