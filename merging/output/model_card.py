"""The model card (README.md) written beside a merged checkpoint: recipe, inputs, versions, hash.

It records what is needed to reproduce the merge exactly: the recipe as run, each Hub input's
resolved commit, the versions of basin and its main dependencies, and a content hash of the
output tensors (see `ShardWriter.content_hash`).
"""

from __future__ import annotations

from dataclasses import dataclass

from merging.recipe.schema import Recipe


@dataclass(frozen=True)
class InputRecord:
    ref: str
    repo_id: str | None
    revision: str | None

    def to_json(self) -> dict[str, str | None]:
        return {"ref": self.ref, "repo_id": self.repo_id, "revision": self.revision}


def front_matter(recipe: Recipe | None, inputs: list[InputRecord], library: str = "transformers",
                 tags: tuple[str, ...] = ("merge", "basin")) -> list[str]:
    """The Hub's YAML header: base_model (the Hub inputs), library_name, tags (a merge's: [merge, basin])."""
    hub = list(dict.fromkeys(i.repo_id for i in inputs if i.repo_id))
    front = ["---"]
    if hub:
        front += ["base_model:"] + [f"- {r}" for r in hub]
    front += [f"library_name: {library}", "tags:", *(f"- {t}" for t in tags), "---"]
    return front


def card_text(front: list[str], title: str, intro: str, inputs: list[InputRecord],
              sections: list[tuple[str, list[str]]], content_hash: str, versions: dict[str, str]) -> str:
    """A card (merge, tokensurgeon, extracted adapter): front matter, title, intro, the inputs' table, `sections`
    (heading, lines), then the content hash and versions. A function of its arguments only (no time, host or
    output path): reruns write byte-identical cards."""
    rows = [f"| `{i.ref}` | {i.repo_id or 'local'} | {i.revision or '-'} |" for i in inputs]
    body = [f"# {title}", "", intro, "", "## Inputs", "", "| reference | Hub repository | resolved commit |",
            "|---|---|---|", *rows, ""]
    for heading, lines in sections:
        body += [f"## {heading}", "", *lines, ""]
    body += ["## Reproducibility", "",
             f"- content hash of the tensors (sha256 over name, dtype, shape, data): `{content_hash}`",
             f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}", ""]
    return "\n".join(front + [""] + body)


def model_card(recipe: Recipe, inputs: list[InputRecord], content_hash: str, versions: dict[str, str],
               title: str) -> str:
    """A merge's card: its method, inputs and recipe (`card_text`)."""
    intro = (f"This model is a merge made with basin {versions.get('basin', '')}, using the "
             f"`{recipe.merge_method}` merge method.")
    recipe_lines = ["```yaml", recipe.to_yaml().rstrip(), "```"]
    return card_text(front_matter(recipe, inputs), title, intro, inputs, [("Recipe", recipe_lines)], content_hash,
                     versions)


def with_section(card: str, heading: str, body: str) -> str:
    """`card` with its `## heading` section (up to the next `## ` heading) replaced by `body`, or `body` appended as
    that section; the text is given already computed (merging measures nothing)."""
    lines = card.rstrip("\n").split("\n") if card.strip() else []
    title = f"## {heading}"
    section = [title, "", *body.strip("\n").split("\n"), ""]
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + section + lines[end:]
    else:
        lines = lines + ([""] if lines else []) + section
    return "\n".join(lines).rstrip("\n") + "\n"
