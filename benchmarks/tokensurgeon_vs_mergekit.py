"""`basin tokensurgeon` side by side with mergekit-tokensurgeon 0.1.5 (its own venv, a subprocess; skipped without
it), on a tiny Llama pair whose word tokenizers differ (the donor's embedding padded by 3 rows).

Compared per output row: shared tokens (rows copied: must be bit-identical), donor-only tokens (OMP: basin in
float64, mergekit in float32, so they agree to float32 rounding), the rows count (mergekit keeps one row per
donor token, dropping the donor's padding; basin keeps the donor's row count), config.json and each whole
process's wall time, CPU time and peak RSS (`benchmarks/_peer.timed`, as the other side-by-side benchmarks).

    python benchmarks/tokensurgeon_vs_mergekit.py [--mergekit /work/peers/mk/bin/mergekit-tokensurgeon] [-k 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _peer import timed  # noqa: E402


def _pair(root: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests" / "merging"))
    from test_tokensurgeon import DONOR_WORDS, MODEL_WORDS, save  # the tests' builders: one definition

    return (save(root / "model", "llama", MODEL_WORDS, 0, False),
            save(root / "donor", "llama", DONOR_WORDS, 1, False, pad_rows=3, donor=True))


def _rows(basin: Path, mk: Path, model: Path, donor: Path) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from merging.tokensurgeon.vocab import match

    a, b = load_file(basin / "model.safetensors"), load_file(mk / "model.safetensors")
    tokens = match(AutoTokenizer.from_pretrained(model), AutoTokenizer.from_pretrained(donor), 10**9)
    out: dict = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        shared = [i for i in tokens.shared if i < b[name].shape[0]]
        new = [i for i in tokens.new if i < b[name].shape[0]]
        diff = (a[name][new].double() - b[name][new].double()).abs()
        norm = b[name][new].double().norm(dim=1).clamp_min(1e-30)  # a zero row (mergekit's <pad>): no NaN
        out[name] = {"rows basin / mergekit": [a[name].shape[0], b[name].shape[0]],
                     "shared rows bit-identical": bool(torch.equal(a[name][shared], b[name][shared])),
                     "new rows max abs diff": float(diff.max()) if new else 0.0,
                     "new rows max rel diff": float((diff.norm(dim=1) / norm).max())}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default="/work/peers/mk/bin/mergekit-tokensurgeon")
    parser.add_argument("-k", type=int, default=8, help="OMP's k (mergekit refuses k > the shared tokens, 10 here)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not Path(args.mergekit).exists():
        print(f"skipped: {args.mergekit} not found", file=sys.stderr)
        return {}
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="basin-surgeon-") as tmp:
        root = Path(tmp)
        model, donor = _pair(root)
        times = {"mergekit": timed([args.mergekit, str(model), str(donor), str(root / "mk"), "-k", str(args.k)], env),
                 "basin": timed([sys.executable, "-m", "evaluations.cli", "tokensurgeon", str(model), str(donor),
                                str(root / "basin"), "-k", str(args.k), "--no-progress"], env)}
        cfg = [json.loads((root / f / "config.json").read_text()) for f in ("basin", "mk")]
        result = {"benchmark": "tokensurgeon_vs_mergekit", "model": "tiny llama (hidden 16), word tokenizers, "
                  f"10 shared / 5 donor-only tokens, omp k={args.k}", "machine": platform.platform(),
                  "cpus": os.cpu_count(), "torch": torch.__version__, "runs": times,
                  "rows": _rows(root / "basin", root / "mk", model, donor),
                  "config differences": {k: [cfg[0].get(k), cfg[1].get(k)] for k in sorted(set(cfg[0]) | set(cfg[1]))
                                         if cfg[0].get(k) != cfg[1].get(k)}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokensurgeon.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
