"""Tokenizer and vocabulary surgery (mergekit's `tokenizer_source` / `tokenizer:` semantics).

The output vocabulary is `base` (the base model's tokenizer; the first model when the recipe has no
base_model), a named model's tokenizer, or `union`: the base's tokens keep their ids, then every
token of the other inputs that the base lacks is appended as an added token, model by model in
recipe order and, within a model, by increasing id (deterministic). The output tokenizer is
built with `transformers` from the inputs' local tokenizer files (never downloaded here, never
`trust_remote_code`).

Rows (embeddings, `lm_head`): every input's vocabulary-indexed tensor is remapped to the output
vocabulary before the merge method runs, so the method sees aligned rows. For each output
token, a model that has it contributes its own row; a model that lacks it gets a fill row:
- the token's explicit rule in `tokenizer.tokens` (`source: <model>`: that model's row for it;
  `{kind: zero}`; `{kind: model_token, model, token | token_id}`: that model's row for another token);
- else, if exactly one input has it, that input's row (so the merge returns that row unchanged
  for linear-type methods);
- else, if several have it and the base is one of them, the base's row;
- else, if several have it, the mean of their rows;
- else (no input has it: a token only the tokenizer source knows, or padding from
  `pad_to_multiple_of`), each model's mean embedding (the mean of its rows that carry a token).
  This last case differs from mergekit, which writes zeros; `{kind: zero}` gives zeros.
`force: true` makes every model take the fill row for that token, including those that have it.

Rows beyond an input's tokenizer (padding some checkpoints carry) hold no token: for `base` or
a named merged model as the source they are kept (the output keeps that model's row count, the
other models take its rows there); a `union` that adds tokens does not carry them over (its
added tokens take those ids), so pad with `pad_to_multiple_of` if needed.

Inputs without tokenizer files are taken to use the base's vocabulary (`union`) or the source's
(`base`, a model), which requires their row count to match it. When no merged input has tokenizer
files nothing can be remapped: the source's tokenizer files are copied and the embeddings merged
as they are (equal row counts required).

Without a tokenizer rule (rule): the embeddings are merged row by row, so the inputs must share one
vocabulary. Differing row counts are refused (`merging.plan.tensors`), and so are equal row counts with
differing vocabularies (`check_same_vocab`): every merged input that has vocabulary rows and tokenizer
files must map the same tokens to the same ids as the base (the first such input when the base has
none), else the merge stops before any weight is read, naming both models, the number of tokens whose
ids differ and a few of them, and the fix (`tokenizer_source: union | base | <model>` or a `tokenizer:`
block). Inputs without tokenizer files are not compared. The check is cheap: byte-identical tokenizer
files are not parsed; otherwise token -> id is read straight from `tokenizer.json` (`model.vocab` and
`added_tokens`), else `vocab.json` or `vocab.txt` (with `added_tokens.json` and `tokenizer_config.json`'s
`added_tokens_decoder`); transformers is loaded only for a folder these do not describe (a sentencepiece
model alone, or added tokens these files disagree on). A folder transformers cannot read either is
skipped with a warning.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merging.io.hf_files import TOKENIZER_MAIN, VOCAB_FILES
from merging.recipe.tokenizer import TokenizerSpec
from taxonomy.errors import BasinError

ROW_CHUNK = 4096  # rows per step when averaging a model's embedding (bounded float32 working set)


# --- tokenizer files ---------------------------------------------------------------------------------
def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / name).is_file() for name in TOKENIZER_MAIN)


def load_tokenizer(folder: Path, label: str) -> Any:
    """A fresh tokenizer from local files with transformers (no download, no remote code)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BasinError(f"{label}: tokenizer surgery needs the optional dependency transformers "
                         "(pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # transformers raises many types (OSError, ValueError, ImportError, ...)
        raise BasinError(f"{label}: cannot load the tokenizer in {folder} with transformers: "
                         f"{type(err).__name__}: {str(err)[:300]}") from None


@functools.lru_cache(maxsize=32)
def _vocab_cached(folder: str, mtime: float, label: str) -> dict[str, int]:
    return dict(load_tokenizer(Path(folder), label).get_vocab())


def tokenizer_vocab(folder: Path, label: str) -> dict[str, int]:
    """token -> id of a folder's tokenizer (added tokens included), cached per folder and file time."""
    mtime = max((folder / n).stat().st_mtime for n in (*TOKENIZER_MAIN, "tokenizer_config.json")
                if (folder / n).is_file())
    return _vocab_cached(str(folder), mtime, label)


# --- the no-rule check: one vocabulary for every input (module docstring) ------------------------------------


def _vocab_files(folder: Path) -> list[Path]:
    return [folder / n for n in VOCAB_FILES if (folder / n).is_file()]


def same_tokenizer_files(a: Path, b: Path) -> bool:
    """Whether two folders hold the same vocabulary-defining files, byte for byte."""
    fa, fb = _vocab_files(a), _vocab_files(b)
    if [f.name for f in fa] != [f.name for f in fb] or any(x.stat().st_size != y.stat().st_size
                                                             for x, y in zip(fa, fb)):
        return False
    return all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _config_added(folder: Path) -> dict[str, int] | None:
    """Added tokens of `added_tokens.json` and `tokenizer_config.json`'s `added_tokens_decoder` (None: unreadable)."""
    added: dict[str, int] = {}
    if (folder / "added_tokens.json").is_file():
        data = _json(folder / "added_tokens.json")
        if not isinstance(data, dict) or not all(isinstance(i, int) for i in data.values()):
            return None
        added.update(data)
    if (folder / "tokenizer_config.json").is_file():
        config = _json(folder / "tokenizer_config.json")
        if not isinstance(config, dict):
            return None
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            return None
        for i, tok in decoder.items():
            content = tok.get("content") if isinstance(tok, dict) else tok
            if not isinstance(content, str) or not str(i).isdigit():
                return None
            added[content] = int(i)
    return added


def vocab_from_files(folder: Path) -> dict[str, int] | None:
    """token -> id read from a folder's tokenizer files without transformers (module docstring); None when
    they do not describe it (a sentencepiece model alone, an unknown layout, added tokens that disagree)."""
    added = _config_added(folder)
    if added is None:
        return None
    if (folder / "tokenizer.json").is_file():
        data = _json(folder / "tokenizer.json")
        model = data.get("model") if isinstance(data, dict) else None
        raw = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(raw, dict) and all(isinstance(i, int) for i in raw.values()):
            vocab = dict(raw)  # BPE, WordPiece, WordLevel
        elif isinstance(raw, list) and all(isinstance(e, list) and e and isinstance(e[0], str) for e in raw):
            vocab = {e[0]: i for i, e in enumerate(raw)}  # Unigram: [piece, score] by id
        else:
            return None
        for tok in data.get("added_tokens") or []:
            if not isinstance(tok, dict) or not isinstance(tok.get("content"), str) or not isinstance(
                    tok.get("id"), int):
                return None
            vocab[tok["content"]] = tok["id"]
        # a fast tokenizer appends config-only added tokens at new ids: leave such folders to transformers
        return vocab if all(vocab.get(t) == i for t, i in added.items()) else None
    if (folder / "vocab.json").is_file():
        raw = _json(folder / "vocab.json")
        if not isinstance(raw, dict) or not all(isinstance(i, int) for i in raw.values()):
            return None
        vocab = dict(raw)
    elif (folder / "vocab.txt").is_file():
        try:
            lines = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError):
            return None
        if lines and lines[-1] == "":
            lines.pop()
        vocab = {line: i for i, line in enumerate(lines)}  # a repeated token keeps its last id (transformers)
    else:
        return None
    vocab.update(added)
    return vocab


@functools.lru_cache(maxsize=32)
def _file_vocab_cached(folder: str, stamp: tuple) -> dict[str, int] | None:
    return vocab_from_files(Path(folder))


def input_vocab(folder: Path, label: str) -> dict[str, int] | None:
    """token -> id of an input's tokenizer: from its files, else with transformers; None (with a warning)
    when neither can read it. Cached per folder and file times."""
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in _vocab_files(folder))
    vocab = _file_vocab_cached(str(folder), stamp)
    if vocab is not None:
        return vocab
    try:
        return tokenizer_vocab(folder, label)
    except BasinError as err:
        warnings.warn(f"{label}: its vocabulary is not compared with the other inputs' ({err})", stacklevel=2)
        return None


def vocab_differences(a: dict[str, int], b: dict[str, int]) -> tuple[list[str], list[str], list[str]]:
    """(tokens in both at different ids, tokens only in a, tokens only in b), each by its smallest id."""
    moved = sorted((t for t, i in a.items() if t in b and b[t] != i), key=lambda t: (min(a[t], b[t]), t))
    only_a = sorted((t for t in a if t not in b), key=lambda t: (a[t], t))
    only_b = sorted((t for t in b if t not in a), key=lambda t: (b[t], t))
    return moved, only_a, only_b


def check_same_vocab(refs: list[str], folders: dict[str, Path | None], rows: dict[str, int | None],
                     base_ref: str | None = None, examples: int = 5) -> None:
    """Without a tokenizer rule: every input with vocabulary rows and tokenizer files has the base's
    token -> id map (module docstring), else a BasinError naming both models and the fix."""
    compared = [r for r in refs if rows.get(r) is not None and has_tokenizer(folders.get(r))]
    if len(compared) < 2:
        return
    ref = base_ref if base_ref in compared else compared[0]
    ref_folder: Path = folders[ref]  # type: ignore[assignment]
    ref_vocab: dict[str, int] | None = None
    for other in compared:
        folder: Path = folders[other]  # type: ignore[assignment]
        if other == ref or same_tokenizer_files(ref_folder, folder):
            continue
        if ref_vocab is None:
            ref_vocab = input_vocab(ref_folder, ref)
            if ref_vocab is None:
                return
        vocab = input_vocab(folder, other)
        if vocab is None or vocab == ref_vocab:
            continue
        moved, only_a, only_b = vocab_differences(ref_vocab, vocab)
        n = len(moved) + len(only_a) + len(only_b)
        sample = sorted(moved + only_a + only_b,
                        key=lambda t: min(ref_vocab.get(t, 1 << 62), vocab.get(t, 1 << 62)))[:examples]
        shown = ", ".join(f"{t!r}: {ref_vocab.get(t, '-')}/{vocab.get(t, '-')}" for t in sample)
        raise BasinError(
            f"tokenizers differ: {ref} and {other} have {_rows_text(rows[ref], rows[other])} but {n} token(s) have "
            f"different ids ({len(moved)} in both at other ids, {len(only_a)} only in {ref}, {len(only_b)} only in "
            f"{other}; e.g. token: id in {ref}/in {other}: {shown}), so merging their embeddings row by row would "
            "mix different tokens. Set tokenizer_source: union (or base, or a model reference) or a tokenizer: "
            "block to match rows by token string")


def _rows_text(a: int | None, b: int | None) -> str:
    return f"{a} vocabulary rows each" if a == b else f"{a} and {b} vocabulary rows"


@functools.lru_cache(maxsize=8)
def union_tokenizer(base: tuple[str, str], others: tuple[tuple[str, str], ...]) -> tuple[Any, int]:
    """The base tokenizer (folder, label) with every token of `others` it lacks appended as added tokens
    (model by model, by increasing id); returns (tokenizer, number of tokens added)."""
    out = load_tokenizer(Path(base[0]), base[1])
    have = set(out.get_vocab())
    new: list[Any] = []
    for folder, label in others:
        tok = load_tokenizer(Path(folder), label)
        decoder = tok.added_tokens_decoder
        for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if token not in have:
                have.add(token)
                new.append(decoder.get(i, token))  # an added token keeps its flags (special, normalized)
    if new:
        out.add_tokens(new)
    vocab = out.get_vocab()
    lost = [str(t) for t in new if str(t) not in vocab]
    if lost:
        raise BasinError(f"tokenizer union: {len(lost)} token(s) could not be added to {base[1]}'s tokenizer, "
                         f"e.g. {lost[:3]}")
    return out, len(new)


# --- the row map ---------------------------------------------------------------------------------------
@dataclass
class VocabMap:
    """How the vocabulary-indexed rows of each input map to the output rows.

    `perms[i][r]` is input i's row for output row r, or -1 when input i lacks that token; `own[i]`
    are input i's rows that carry a token (its mean embedding is taken over them); `rules` maps an
    output row to (kind, input index, source row, force) from `tokenizer.tokens`.
    """

    source: str
    size: int
    inputs: list[str]
    perms: list[torch.Tensor]
    own: list[torch.Tensor]
    base: int | None
    rules: dict[int, tuple[str, int | None, int | None, bool]]
    tokenizer: Any | None  # a built tokenizer to save (union with added tokens), else None
    tokenizer_folder: Path | None  # None when `tokenizer` is set: tokenizer files are copied from here
    added: int = 0
    identity: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "size": self.size, "added_tokens": self.added, "identity": self.identity,
                "rules": {str(k): list(v) for k, v in sorted(self.rules.items())},
                "perm_fingerprint": _fingerprint(self.perms)}

    def remap_inputs(self, name: str, sources: list[tuple[int, str]], base: tuple[int, str] | None,
                     tensors: list[torch.Tensor], base_tensor: torch.Tensor | None
                     ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Remap one planned tensor's inputs (the base too) to the output rows."""
        order = [i for i, _ in sources] + ([base[0]] if base is not None else [])
        given = tensors + ([base_tensor] if base is not None else [])
        unique: dict[int, torch.Tensor] = {}
        for i, t in zip(order, given):
            unique.setdefault(i, t)
        idx = list(unique)
        rules = {}
        for row, (kind, src, src_row, force) in self.rules.items():
            if src is not None and src not in unique:
                raise BasinError(f"{name}: tokenizer.tokens takes output row {row} from {self.inputs[src]}, "
                                 "which does not enter this tensor")
            rules[row] = (kind, None if src is None else idx.index(src), src_row, force)
        base_pos = idx.index(self.base) if self.base in unique else None
        out = remap_rows([unique[i] for i in idx], [self.perms[i] for i in idx], [self.own[i] for i in idx],
                         base_pos, rules)
        by_input = dict(zip(idx, out))
        mapped = [by_input[i] for i, _ in sources]
        return mapped, (None if base is None else by_input[base[0]])


def _fingerprint(perms: list[torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in perms:
        h.update(p.numpy().tobytes())
    return h.hexdigest()[:16]


def mean_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """float32 mean of `tensor[rows]`, summed in chunks of ROW_CHUNK rows (bounded working set)."""
    if rows.numel() == 0:
        return torch.zeros(tensor.shape[1:], dtype=torch.float32, device=tensor.device)
    acc = torch.zeros(tensor.shape[1:], dtype=torch.float32, device=tensor.device)
    for start in range(0, rows.numel(), ROW_CHUNK):
        acc += tensor[rows[start:start + ROW_CHUNK].to(tensor.device)].to(torch.float32).sum(0)
    return acc / rows.numel()


def remap_rows(tensors: list[torch.Tensor], perms: list[torch.Tensor], own: list[torch.Tensor],
               base: int | None = None, rules: dict[int, tuple[str, int | None, int | None, bool]] | None = None
               ) -> list[torch.Tensor]:
    """Each tensor's rows rearranged to the output vocabulary (module docstring: the fill rules).

    `perms[i]` (LongTensor, one entry per output row): the source row of tensor i, or -1 where
    model i lacks the token; `base` indexes the base model among `tensors`; `rules` as in `VocabMap`
    (input positions among `tensors`). Results keep each tensor's dtype; fills are computed in float32.
    """
    rules = rules or {}
    k = len(tensors)
    dev = tensors[0].device
    perms = [p.to(dev) for p in perms]
    present = torch.stack([p >= 0 for p in perms])  # (k, n)
    count = present.sum(0)
    forced = torch.zeros_like(count, dtype=torch.bool)
    ruled = torch.zeros_like(count, dtype=torch.bool)
    for row, (_, _, _, force) in rules.items():
        ruled[row] = True
        forced[row] = force
    out = [t[p.clamp(min=0)] for t, p in zip(tensors, perms)]  # a new tensor per input
    rows = ((count < k) | forced).nonzero().squeeze(1)
    if rows.numel() == 0:
        return out
    shape = (-1,) + (1,) * (tensors[0].dim() - 1)
    pres = present[:, rows]
    fill = torch.zeros((rows.numel(),) + tuple(tensors[0].shape[1:]), dtype=torch.float32, device=dev)
    for o, pr in zip(out, pres):
        fill += o[rows].to(torch.float32) * pr.view(shape)
    n = count[rows]
    fill /= n.clamp(min=1).view(shape).to(torch.float32)
    if base is not None:
        use = pres[base] & (n > 1)
        fill[use] = out[base][rows[use]].to(torch.float32)
    pos = {int(r): j for j, r in enumerate(rows.tolist())}
    for row, (kind, src, src_row, _) in rules.items():
        if row not in pos:
            continue
        if kind == "zero":
            fill[pos[row]] = 0.0
        elif kind == "model":
            fill[pos[row]] = out[src][row].to(torch.float32)
        else:
            fill[pos[row]] = tensors[src][src_row].to(torch.float32)
    absent = (n == 0) & ~ruled[rows]
    for i in range(k):
        take = ~pres[i] | forced[rows]
        f = fill
        if bool((absent & take).any()):
            f = fill.clone()
            f[absent] = mean_rows(tensors[i], own[i])
        out[i][rows[take]] = f[take].to(out[i].dtype)
    return out


# --- building the map from the recipe and the inputs ------------------------------------------------------
def plan_vocab(spec: TokenizerSpec, refs: list[str], folders: dict[str, Path | None], rows: dict[str, int | None],
               base_ref: str | None, source_folder: Path | None) -> VocabMap | None:
    """The output vocabulary and each input's row map, from tokenizer files and row counts (no weights).

    `refs`: the merged inputs (plan order); `rows`: their vocabulary row counts (None: no embedding);
    `base_ref`: the recipe's base model (None: the first input); `source_folder`: the folder of a
    `source: <model>` that is not a merged input. None when nothing is remapped (copy-only, see the
    module docstring).
    """
    base_ref = base_ref if base_ref in refs else refs[0]
    with_tok = [r for r in refs if has_tokenizer(folders.get(r))]
    if spec.model_ref is not None:
        target_ref = spec.model_ref
        target_folder = folders.get(target_ref) if target_ref in refs else source_folder
    else:
        target_ref, target_folder = base_ref, folders.get(base_ref)
    if not with_tok:
        if spec.source == "union" or spec.tokens or spec.pad_to_multiple_of:
            raise BasinError(f"tokenizer: {_what(spec)} needs the models' tokenizer files, and none of "
                             f"{refs} has any")
        return None
    if not has_tokenizer(target_folder):
        raise BasinError(f"tokenizer_source {spec.source!r}: {target_ref} has no tokenizer files"
                         + ("" if target_folder is None else f" in {target_folder}"))
    vocabs = {r: tokenizer_vocab(folders[r], r) for r in with_tok}  # type: ignore[arg-type]
    target_vocab = vocabs.get(target_ref) or tokenizer_vocab(target_folder, target_ref)  # type: ignore[arg-type]
    tokenizer, tok_folder, added, out_vocab = _output_vocab(spec, folders, with_tok, base_ref, target_folder,
                                                            target_vocab)
    n_tok = max(out_vocab.values()) + 1
    ref_rows = rows.get(target_ref) if target_ref in refs else None
    keep_padding = spec.source != "union" or not added  # a union that adds nothing is the base's vocabulary
    size = n_tok
    if keep_padding and ref_rows is not None:
        size = max(size, ref_rows)  # keep the source model's padding rows
    _check_untokenized(refs, vocabs, rows, target_ref, n_tok)
    if spec.pad_to_multiple_of:
        m = spec.pad_to_multiple_of
        size = -(-size // m) * m
    perms, own = [], []
    for r in refs:
        vocab = vocabs.get(r, target_vocab)
        pad = keep_padding and (r == target_ref or r not in vocabs)
        perm, owned = _row_map(vocab, out_vocab, rows.get(r) or 0, size, n_tok, pad)
        perms.append(perm)
        own.append(owned)
    rules = _resolve_rules(spec, refs, out_vocab, vocabs, target_vocab, rows, perms)
    identity = not rules and all(
        rows.get(r) == size and torch.equal(p, torch.arange(size)) for r, p in zip(refs, perms))
    return VocabMap(spec.source, size, list(refs), perms, own,
                    refs.index(base_ref), rules, tokenizer, tok_folder, added, identity)


def _output_vocab(spec: TokenizerSpec, folders: dict[str, Path | None], with_tok: list[str], base_ref: str,
                  target_folder: Path | None, target_vocab: dict[str, int]) -> tuple[Any, Path | None, int, dict]:
    """(built tokenizer or None, folder to copy the tokenizer from or None, tokens added, output vocabulary):
    the target's vocabulary, or for `source: union` the base's extended by the other models' tokens."""
    if spec.source != "union":
        return None, target_folder, 0, target_vocab
    others = tuple((str(folders[r]), r) for r in with_tok if r != base_ref)
    built, added = union_tokenizer((str(target_folder), base_ref), others)
    if added:
        return built, None, added, dict(built.get_vocab())
    return None, target_folder, added, target_vocab


def _check_untokenized(refs: list[str], vocabs: dict[str, dict[str, int]], rows: dict[str, int | None],
                       target_ref: str, n_tok: int) -> None:
    """An input without tokenizer files is taken to use the target's vocabulary: its row count must agree."""
    for r in refs:
        if r not in vocabs and rows.get(r) is not None:
            want = rows.get(target_ref) if target_ref in refs else n_tok
            if rows[r] != want:
                raise BasinError(f"{r} has no tokenizer files and {rows[r]} embedding rows, while "
                                 f"{target_ref} (whose vocabulary it would be taken to use) has {want}")


def _row_map(vocab: dict[str, int], out_vocab: dict[str, int], n_rows: int, size: int, n_tok: int,
             keep_padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, own) of one input: perm[j] its row holding output row j's token (-1: none; its padding rows past
    the tokens kept in place if `keep_padding`), own its rows that hold a token of its own vocabulary."""
    perm = torch.full((size,), -1, dtype=torch.long)
    src, dst = [], []
    for token, j in out_vocab.items():
        i = vocab.get(token)
        if i is not None and i < n_rows and j < size:
            src.append(i)
            dst.append(j)
    perm[torch.tensor(dst, dtype=torch.long)] = torch.tensor(src, dtype=torch.long)
    if keep_padding and n_rows > n_tok:
        perm[n_tok:n_rows] = torch.arange(n_tok, n_rows)
    return perm, torch.tensor(sorted({i for i in vocab.values() if i < n_rows}), dtype=torch.long)


def _what(spec: TokenizerSpec) -> str:
    if spec.source == "union":
        return "source union"
    return "tokens overrides" if spec.tokens else "pad_to_multiple_of"


def _resolve_rules(spec: TokenizerSpec, refs: list[str], out_vocab: dict[str, int], vocabs: dict[str, dict[str, int]],
                   target_vocab: dict[str, int], rows: dict[str, int | None], perms: list[torch.Tensor]
                   ) -> dict[int, tuple[str, int | None, int | None, bool]]:
    rules: dict[int, tuple[str, int | None, int | None, bool]] = {}
    for token, rule in spec.tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        if token not in out_vocab:
            raise BasinError(f"{where}: the token is not in the output vocabulary ({spec.source})")
        row = out_vocab[token]
        s = rule.source
        if s.kind == "zero":
            rules[row] = ("zero", None, None, rule.force)
            continue
        if s.model not in refs:
            raise BasinError(f"{where}: model {s.model!r} is not one of the merged models {refs}")
        m = refs.index(s.model)
        if s.kind == "model":
            if int(perms[m][row]) < 0:
                raise BasinError(f"{where}: {s.model} does not have this token")
            rules[row] = ("model", m, None, rule.force)
            continue
        vocab = vocabs.get(s.model, target_vocab)
        src_row = s.token_id if s.token is None else vocab.get(s.token)
        if src_row is None:
            raise BasinError(f"{where}: {s.model} has no token {s.token!r}")
        if not 0 <= src_row < (rows.get(s.model) or 0):
            raise BasinError(f"{where}: token id {src_row} is outside {s.model}'s {rows.get(s.model)} rows")
        rules[row] = ("model_token", m, src_row, rule.force)
    return rules
