"""The model card (README.md) written beside a merged checkpoint: recipe, inputs, versions, hash.

It records what is needed to reproduce the merge exactly: the recipe as run, each Hub input's
resolved commit, the versions of basin and its main dependencies, and a content hash of the
output tensors (see `ShardWriter.content_hash`).
"""

from __future__ import annotations

from dataclasses import dataclass

from merging.recipe import Recipe


@dataclass(frozen=True)
class InputRecord:
    ref: str
    repo_id: str | None
    revision: str | None

    def to_json(self) -> dict[str, str | None]:
        return {"ref": self.ref, "repo_id": self.repo_id, "revision": self.revision}


def model_card(recipe: Recipe, inputs: list[InputRecord], content_hash: str, versions: dict[str, str],
               title: str) -> str:
    hub = sorted({i.repo_id for i in inputs if i.repo_id})
    front = ["---", "library_name: transformers", "tags:", "- merge", "- basin"]
    if hub:
        front += ["base_model:"] + [f"- {r}" for r in hub]
    front.append("---")
    rows = [f"| `{i.ref}` | {i.repo_id or 'local'} | {i.revision or '-'} |" for i in inputs]
    version_line = ", ".join(f"{k} {v}" for k, v in versions.items())
    body = [
        f"# {title}",
        "",
        f"Merged with [basin](https://github.com/) {versions.get('basin', '')} using `{recipe.merge_method}`.",
        "",
        "## Inputs",
        "",
        "| reference | Hub repository | resolved commit |",
        "|---|---|---|",
        *rows,
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
        "## Reproducibility",
        "",
        f"- content hash of the tensors (sha256 over name, dtype, shape, data): `{content_hash}`",
        f"- versions: {version_line}",
        "",
    ]
    return "\n".join(front + [""] + body)
