"""`basin search` on a TIES merge of two small-LM fine-tunes: overhead per trial, best vs defaults, Ray vs local.

Three small Llamas over a 64-word vocabulary: a base trained on text of one Markov chain, two fine-tunes of it on
two other chains (tasks A and B). The search tunes TIES's four per-model values (weight and density of each
fine-tune) on calibration text (half A, half B) for `--trials` trials (TPE, seed 0), locally and with two Ray
workers; the best recipe and the recipe's defaults (weight 1.0, density 0.5) are then merged with `basin merge`
and measured on held-out text of both tasks. Locally the search runs twice: with torch's default threads and with
one thread (as each Ray worker: on a loaded machine, threads that wait for each other's cores slow a tiny model's
scoring many times over). Reported per run: the wall time per trial (the loop's, first ask to last tell, divided by
the trials), its merge (planning included) and scoring, the overhead beyond them as a fraction of the wall time per
trial (sampler, storage, transfers; also by Optuna's ask-to-tell clock), Ray's wall time per trial against local,
held-out losses. Writes benchmarks/results/search_ties.json.

    nice python benchmarks/search_ties.py [--trials 30] [--hidden 64] [--steps 60] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(60)]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def chain(seed: int, fan: int = 3) -> list[list[int]]:
    """A sparse Markov chain over WORDS: each word has `fan` successors."""
    rng = random.Random(seed)
    return [rng.sample(range(len(WORDS)), fan) for _ in WORDS]


def text(ch: list[list[int]], words: int, seed: int) -> str:
    rng = random.Random(seed)
    w, out = rng.randrange(len(WORDS)), []
    for _ in range(words):
        out.append(WORDS[w])
        w = rng.choice(ch[w])
    return " ".join(out)


def model(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def train(m, tok, corpus: str, steps: int, lr: float, seed: int) -> None:
    ids = torch.tensor(tok(corpus)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    m.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=g)
        batch = torch.stack([ids[s:s + 32] for s in starts])
        loss = m(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()


def build(root: Path, hidden: int, layers: int, steps: int) -> dict[str, Path]:
    tok = tokenizer()
    base_chain, a_chain, b_chain = chain(0), chain(1), chain(2)
    base = model(hidden, layers)
    train(base, tok, text(base_chain, 40_000, 10) + " " + text(a_chain, 4_000, 11) + " " + text(b_chain, 4_000, 12),
          steps, 3e-3, 0)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for name, ch, seed in (("ft_a", a_chain, 21), ("ft_b", b_chain, 22)):
        ft = model(hidden, layers)
        ft.load_state_dict(base.state_dict())
        train(ft, tok, text(ch, 20_000, seed), steps // 2, 1e-3, seed)
        paths[name] = root / name
        ft.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    half = 1_500
    (root / "calib.txt").write_text(text(a_chain, half, 31) + "\n" + text(b_chain, half, 32) + "\n")
    (root / "heldout.txt").write_text(text(a_chain, half, 41) + "\n" + text(b_chain, half, 42) + "\n")
    recipe = root / "ties.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {paths['base']}\nparameters: {{normalize: true}}\nmodels:\n"
        + "".join(f"  - model: {paths[n]}\n    parameters:\n"
                  "      weight: {search: [0.2, 1.5], default: 1.0}\n"
                  "      density: {search: [0.1, 1.0], default: 0.5}\n" for n in ("ft_a", "ft_b")))
    return {**paths, "recipe": recipe, "calib": root / "calib.txt", "heldout": root / "heldout.txt"}


def search(files: dict[str, Path], out: Path, trials: int, executor: str, threads: int | None = None) -> dict:
    from evaluations.search import DataSpec, SearchOptions, run_search
    from evaluations.search.report import overhead, trial_rows

    opts = SearchOptions(files["recipe"], out, trials, data=DataSpec(str(files["calib"]), seq_len=64, batch_size=8),
                         executor=executor, workers=2, pruner="none")
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    start = time.perf_counter()
    try:
        result = run_search(opts)
    finally:
        torch.set_num_threads(default)
    elapsed = time.perf_counter() - start
    rows = trial_rows(result.study)
    done = [r for r in rows if r["state"] == "complete"]
    first = min(t.datetime_start for t in result.study.trials)
    last = max(t.datetime_complete for t in result.study.trials)
    best = result.study.best_trial
    wall = (last - first).total_seconds() / len(done)
    work = sum(r["merge_seconds"] + r["score_seconds"] for r in done) / len(done)
    serial = executor == "local"  # Ray's trials overlap: their wall time per trial is not one trial's time
    return {"executor": executor, "threads": 1 if executor == "ray" else threads or default, "trials": len(done),
            "seconds_total": elapsed, "loop_wall_per_trial": wall, "merge_and_score_per_trial": work,
            "overhead_seconds_per_trial": wall - work if serial else None,
            "overhead_fraction_of_wall": (wall - work) / wall if serial else None,
            "time_per_trial": overhead(rows),
            "best": {"number": best.number, "params": best.params, "calib_loss": best.value},
            "result": result}


def losses(recipe, files: dict[str, Path], root: Path, name: str) -> dict[str, float]:
    """Calibration and held-out loss of the recipe's merge (or of a checkpoint folder)."""
    from evaluations.measure import measure_loss
    from evaluations.models import load_model
    from evaluations.text_data import load_data
    from merging.pipeline import merge

    folder = recipe if isinstance(recipe, Path) else root / name
    if not isinstance(recipe, Path):
        merge(recipe, folder, progress=False)
    m = load_model(folder)
    return {k: measure_loss(m, load_data(m, files[k], seq_len=64, batch_size=8)).loss for k in ("calib", "heldout")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="base training steps (fine-tunes: half)")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    from merging.recipe.search_space import SearchSpace

    with tempfile.TemporaryDirectory(prefix="basin-search-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        files = build(root, args.hidden, args.layers, args.steps)
        build_s = time.perf_counter() - t
        runs = [search(files, root / "local", args.trials, "local"),
                search(files, root / "local1", args.trials, "local", threads=1)]
        if not args.no_ray:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                runs.append(search(files, root / "ray", args.trials, "ray"))
            finally:
                ray.shutdown()
        space = SearchSpace.from_yaml(files["recipe"])
        local = runs[0]
        best_recipe = space.recipe(local["best"]["params"])
        report = {
            "what": __doc__.splitlines()[0], "machine": platform.platform(), "threads": torch.get_num_threads(),
            "model": {"hidden": args.hidden, "layers": args.layers,
                      "parameters": sum(p.numel() for p in model(args.hidden, args.layers).parameters())},
            "build_seconds": build_s,
            "defaults": space.defaults(),
            "loss": {"defaults": losses(space.recipe(space.defaults()), files, root, "m_defaults"),
                     "best": losses(best_recipe, files, root, "m_best"),
                     **{n: losses(files[n], files, root, n) for n in ("base", "ft_a", "ft_b")}},
            "runs": [{k: v for k, v in r.items() if k != "result"} for r in runs],
        }
        if len(runs) > 2:
            report["ray_vs_local_wall_per_trial"] = runs[2]["loop_wall_per_trial"] / runs[0]["loop_wall_per_trial"]
            report["ray_vs_local_1_thread_wall_per_trial"] = (runs[2]["loop_wall_per_trial"]
                                                              / runs[1]["loop_wall_per_trial"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_ties.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
