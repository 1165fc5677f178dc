"""The extraction plan, from headers and config.json only (no tensor data): what each fine-tuned tensor becomes.

- `lora`: a 2-D weight of a Linear or Conv1D (an Embedding with `embed_lora`) becomes LoRA factors;
- `full`: anything else (norms, biases, 1-D tensors, embeddings without `embed_lora`, output heads without
  `embed_lora`, modules PEFT cannot wrap) is saved whole, where PEFT loads it: the weights of a `modules_to_save`
  module under their own names, the bias of a LoRA module as `<module>.base_layer.bias`;
- `excluded`: by `include` / `exclude` (regexes searched in the module name, as mergekit's are).
A tied fine-tune (no output head tensor) whose input embedding changes also gets its head saved whole (PEFT's head
of a tied base would keep the base's embedding). Every tensor is in exactly one list of the report: none is dropped.

Errors before any read: a tensor missing from one side, shapes differing (named), a rank larger than a matrix, a
regex that matches no module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from merging.architectures import OUTPUT_EMBED
from merging.extraction.modules import CONV1D, EMBEDDING, LINEAR, ModuleKinds
from merging.io.checkpoint import Checkpoint
from merging.io.lora import tied_input_embedding
from taxonomy.errors import BasinError

LORA, FULL, EXCLUDED = "lora", "full", "excluded"


@dataclass
class Job:
    """One fine-tuned tensor (`name`) minus its base counterpart (`base_name`), and what it becomes."""

    name: str
    base_name: str
    module: str
    shape: tuple[int, ...]
    kind: str
    action: str
    reason: str = ""
    key: str = ""  # the adapter's name for a full tensor (without PEFT's "base_model.model." prefix)

    @property
    def transpose(self) -> bool:
        """PEFT factors Conv1D and Embedding differences transposed (their weights are stored in x out)."""
        return self.kind in (CONV1D, EMBEDDING)


@dataclass
class ExtractionPlan:
    jobs: list[Job]
    kinds: ModuleKinds
    fan_in_fan_out: bool = False
    notes: list[str] = field(default_factory=list)

    def by_action(self, action: str) -> list[Job]:
        return [j for j in self.jobs if j.action == action]


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def pair_names(ft: Checkpoint, base: Checkpoint) -> list[tuple[str, str]]:
    """(fine-tuned name, base name) for every fine-tuned tensor; a fine-tune's own head over a tied base's embedding
    pairs with that embedding. Missing tensors and differing shapes are errors naming the tensor."""
    base_names = set(base.names())
    tied_source = tied_input_embedding(base)
    pairs = []
    for name in ft.names():
        other = name
        if name not in base_names:
            if tied_source is None or not OUTPUT_EMBED.search(name):
                raise BasinError(f"tensor {name!r} of the fine-tune {ft.label} is not in the base {base.label}")
            other = tied_source
        a, b = tuple(ft.meta(name).shape), tuple(base.meta(other).shape)
        if a != b:
            raise BasinError(f"tensor {name!r}: shape {list(a)} in the fine-tune {ft.label}, {list(b)} in the base "
                             f"{base.label} (as {other!r}); extraction needs equal shapes")
        pairs.append((name, other))
    missing = sorted(base_names - set(ft.names()) - {o for _, o in pairs})
    if missing:
        raise BasinError(f"tensor {missing[0]!r} of the base {base.label} is not in the fine-tune {ft.label}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return pairs


def check_regexes(include: list[str], exclude: list[str], modules: list[str]) -> tuple[list, list]:
    """The regexes compiled; one that does not compile or matches no module name is an error."""
    compiled: tuple[list, list] = ([], [])
    for flag, patterns, out in (("--include", include, compiled[0]), ("--exclude", exclude, compiled[1])):
        for pattern in patterns:
            try:
                rx = re.compile(pattern)
            except re.error as err:
                raise BasinError(f"{flag} {pattern!r}: not a regular expression ({err})") from None
            if not any(rx.search(m) for m in modules):
                raise BasinError(f"{flag} {pattern!r} matches no module (modules are named like {modules[0]!r})")
            out.append(rx)
    return compiled


def _selected(module: str, include: list, exclude: list) -> bool:
    if include and not any(rx.search(module) for rx in include):
        return False
    return not any(rx.search(module) for rx in exclude)


def _classify(name: str, shape: tuple[int, ...], kinds: ModuleKinds, embed_lora: bool) -> tuple[str, str, str]:
    """(kind, action, reason) of one selected tensor, before LoRA modules' biases are known."""
    module = module_of(name)
    kind = kinds.kind(module, name, shape)
    if len(shape) != 2 or not name.endswith(".weight"):
        return kind, FULL, f"{len(shape)}-D tensor" if len(shape) != 2 else "not a weight matrix"
    if kind == EMBEDDING:
        return (kind, LORA, "") if embed_lora else (kind, FULL, "embedding (pass --embed-lora to factorise it)")
    if kind == LINEAR and module == kinds.output_embedding and not embed_lora:
        return kind, FULL, "output embedding (pass --embed-lora to factorise it)"
    if kind == LINEAR and kinds.source == "tensor names" and OUTPUT_EMBED.search(name) and not embed_lora:
        return kind, FULL, "output embedding (pass --embed-lora to factorise it)"
    if kind in (LINEAR, CONV1D):
        return kind, LORA, ""
    why = "no such module in the architecture" if kind == "unknown" else f"a {kind}, not a Linear/Conv1D/Embedding"
    return kind, FULL, why


def build_plan(ft: Checkpoint, base: Checkpoint, kinds: ModuleKinds, *, rank: int | str, embed_lora: bool,
               include: list[str], exclude: list[str]) -> ExtractionPlan:
    """Every fine-tuned tensor's job (see the module docstring); errors before any tensor is read."""
    pairs = pair_names(ft, base)
    modules = list(dict.fromkeys(module_of(n) for n, _ in pairs))
    inc, exc = check_regexes(list(include), list(exclude), modules)
    jobs = []
    for name, other in pairs:
        shape = tuple(ft.meta(name).shape)
        module = module_of(name)
        if not _selected(module, inc, exc):
            kind = kinds.kind(module, name, shape)
            jobs.append(Job(name, other, module, shape, kind, EXCLUDED, "--include/--exclude"))
            continue
        kind, action, reason = _classify(name, shape, kinds, embed_lora)
        jobs.append(Job(name, other, module, shape, kind, action, reason, key=name))
    plan = ExtractionPlan(jobs, kinds)
    _orientation(plan)
    _bias_keys(plan)
    _tied_head(plan, ft)
    _check_ranks(plan, rank)
    return plan


def _orientation(plan: ExtractionPlan) -> None:
    """adapter_config.json's `fan_in_fan_out`: true when a LoRA module is a Conv1D. PEFT overrides it per wrapped
    module (True for a Conv1D, False for an nn.Linear), so Linear and Conv1D modules are both LoRA in one adapter."""
    plan.fan_in_fan_out = any(j.kind == CONV1D for j in plan.by_action(LORA))


def _bias_keys(plan: ExtractionPlan) -> None:
    """Other parameters of a LoRA module (its bias) live under PEFT's `<module>.base_layer.<param>`."""
    targets = {j.module for j in plan.by_action(LORA)}
    for j in plan.by_action(FULL):
        if j.module in targets:
            j.key = f"{j.module}.base_layer.{j.name.rsplit('.', 1)[1]}"
            j.reason = "parameter of a LoRA module"


def _tied_head(plan: ExtractionPlan, ft: Checkpoint) -> None:
    """A tied fine-tune's head, saved whole from its input embedding (see the module docstring)."""
    source = tied_input_embedding(ft)
    head = plan.kinds.output_embedding if plan.kinds.source != "tensor names" else "lm_head"
    if source is None or head is None or head + ".weight" in ft.names():
        return
    embed = next((j for j in plan.jobs if j.name == source), None)
    if embed is None or embed.action == EXCLUDED:
        return
    plan.jobs.append(Job(source, embed.base_name, head, embed.shape, LINEAR, FULL,
                         "tied output embedding (PEFT's tied head would keep the base's embedding)",
                         key=head + ".weight"))


def _check_ranks(plan: ExtractionPlan, rank: int | str) -> None:
    if rank == "auto":
        return
    for j in plan.by_action(LORA):
        if int(rank) > min(j.shape):
            raise BasinError(f"tensor {j.name!r} is {j.shape[0]} x {j.shape[1]}: rank {rank} is larger than the "
                             f"matrix (at most {min(j.shape)}); pass a smaller --rank, --rank auto, or --exclude it")
