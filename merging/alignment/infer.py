"""Inferring a permutation spec from a model (Ainsworth et al. 2023, Git Re-Basin, section 3.1).

Two routes, both conservative (anything not proven safe is refused with a BasinError):

- `fx_spec`: trace the model with torch.fx, propagate shapes, and follow each tensor's feature
  axis through the graph with a union-find. A Linear/Conv output starts a new group; elementwise
  ops, BatchNorm/LayerNorm/RMSNorm, pooling and flatten carry it; a residual `add` unites the
  groups of its operands; the model's inputs and outputs are fixed (never permuted). Covers MLPs,
  CNNs with BatchNorm and ResNets.
- `transformer_spec`: BERT- and Llama-style transformers from parameter names, shapes and the
  config: one residual-stream group shared by the embeddings, every block's writes and the
  LayerNorm/RMSNorm weights; per block a head group (blocks of head_dim on q/k/v/o; with grouped
  query attention, key/value heads and their query groups) and an MLP-hidden group. The residual
  stream is fixed when the model returns it (a bare encoder/decoder without a head).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from merging.alignment.spec import PermutationSpec
from taxonomy.errors import BasinError

FIXED = 0  # union-find root of everything that must not be permuted

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Hardswish,
    nn.Hardtanh, nn.ReLU6, nn.Mish, nn.Dropout, nn.Identity, nn.SELU, nn.CELU, nn.Dropout1d, nn.Dropout2d,
)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d)
ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu, torch.tanh,
    torch.sigmoid, torch.nn.functional.leaky_relu, torch.nn.functional.elu, torch.nn.functional.dropout,
    torch.nn.functional.relu6, torch.nn.functional.hardtanh,
}
ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "contiguous", "clone", "relu_"}
POOL_FUNCTIONS = {torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.avg_pool2d,
                  torch.nn.functional.max_pool2d, torch.nn.functional.adaptive_max_pool2d}
ARITH = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv, torch.add,
         torch.mul, torch.sub}


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [FIXED]
        self.size: list[int | None] = [None]
        self.label = ["fixed"]

    def new(self, size: int, label: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.label.append(label)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if FIXED in (ra, rb):
            self.parent[ra if rb == FIXED else rb] = FIXED
            return FIXED
        if self.size[ra] != self.size[rb]:
            raise BasinError(f"{where}: joins feature groups of sizes {self.size[ra]} and {self.size[rb]}")
        lo, hi = sorted((ra, rb))
        self.parent[hi] = lo
        return lo


def infer_spec(model: nn.Module, example_input: Any = None, residual: bool | str = "auto") -> PermutationSpec:
    """The permutation spec of `model`: Hugging Face BERT/Llama-style transformers by structure,
    anything else by torch.fx tracing (needs `example_input` unless the first layer tells its shape)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(model, "base_model_prefix"):
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return transformer_spec(shapes, config.to_dict(), residual=residual)
    return fx_spec(model, example_input)


def _example_for(model: nn.Module) -> torch.Tensor:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return torch.randn(2, m.in_features)
        if isinstance(m, nn.Conv2d):
            return torch.randn(2, m.in_channels, 8, 8)
        if isinstance(m, nn.Conv1d):
            return torch.randn(2, m.in_channels, 16)
    raise BasinError(f"{type(model).__name__}: cannot guess an input shape; pass example_input")


def fx_spec(model: nn.Module, example_input: Any = None) -> PermutationSpec:
    """Trace `model` with torch.fx and infer its spec (see the module docstring)."""
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    name = type(model).__name__
    try:
        gm = symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means we cannot prove safety
        raise BasinError(f"{name}: cannot trace the model with torch.fx ({type(err).__name__}: {err}); "
                         "write a PermutationSpec by hand (merging.alignment.spec_from_groups)") from None
    example = example_input if example_input is not None else _example_for(model)
    examples = example if isinstance(example, tuple) else (example,)
    try:
        ShapeProp(gm).propagate(*examples)
    except Exception as err:  # noqa: BLE001
        raise BasinError(f"{name}: example input does not run through the model ({err})") from None

    uf = _UnionFind()
    value: dict[str, tuple[int, int | None] | None] = {}  # node -> (group id, feature dim) or None (non-tensor)
    param_axes: dict[str, list[int | None]] = {}  # param -> per-axis group id
    modules = dict(gm.named_modules())
    state_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def shape(node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def assign(param: str, axis: int, gid: int | None) -> None:
        axes = param_axes.setdefault(param, [None] * len(state_shapes[param]))
        if gid is None:
            return
        if axes[axis] is None:
            axes[axis] = gid
        else:
            axes[axis] = uf.union(axes[axis], gid, f"parameter {param!r} (shared weights)")

    def refuse(node, why: str) -> BasinError:
        return BasinError(f"{name}: cannot prove a permutation safe at graph node {node.name!r} "
                          f"({node.op} {node.target}): {why}; write a PermutationSpec by hand")

    def arg_value(a):
        return value.get(a.name) if hasattr(a, "name") and a.name in value else None

    for node in gm.graph.nodes:
        nd = len(shape(node))
        if node.op == "placeholder":
            value[node.name] = (FIXED, None)
        elif node.op == "get_attr":
            value[node.name] = None
            if isinstance(getattr(gm, str(node.target), None), torch.Tensor):
                value[node.name] = ("const",)  # type: ignore[assignment]
        elif node.op == "output":
            for a in _flat(node.args):
                v = arg_value(a)
                if v and v[0] != "const":
                    uf.union(v[0], FIXED, "output")
        elif node.op == "call_module":
            mod = modules[node.target]
            inp = arg_value(node.args[0]) if node.args else None
            prefix = f"{node.target}."
            if inp is None or inp[0] == "const" or len(node.args) != 1 or node.kwargs:
                raise refuse(node, "module called with unsupported arguments")
            gid, dim = inp
            in_nd = len(shape(node.args[0]))
            if isinstance(mod, nn.Linear):
                if dim not in (None, in_nd - 1):
                    raise refuse(node, "Linear applied to an axis that is not the feature axis")
                out = uf.new(mod.out_features, node.target)
                assign(prefix + "weight", 0, out)
                assign(prefix + "weight", 1, gid)
                if mod.bias is not None:
                    assign(prefix + "bias", 0, out)
                value[node.name] = (out, nd - 1)
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                if mod.groups != 1:
                    raise refuse(node, "grouped/depthwise convolution")
                if dim not in (None, 1):
                    raise refuse(node, "convolution over an axis that is not the channel axis")
                out = uf.new(mod.out_channels, node.target)
                assign(prefix + "weight", 0, out)
                assign(prefix + "weight", 1, gid)
                if mod.bias is not None:
                    assign(prefix + "bias", 0, out)
                value[node.name] = (out, 1)
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                if dim not in (None, 1):
                    raise refuse(node, "BatchNorm over an axis that is not the channel axis")
                for p in ("weight", "bias", "running_mean", "running_var"):
                    if prefix + p in state_shapes:
                        assign(prefix + p, 0, gid)
                value[node.name] = (gid, 1)
            elif isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
                if len(mod.normalized_shape) != 1 or dim not in (None, in_nd - 1):
                    raise refuse(node, "norm over more than the feature axis")
                for p in ("weight", "bias"):
                    if prefix + p in state_shapes:
                        assign(prefix + p, 0, gid)
                value[node.name] = (gid, dim)
            elif isinstance(mod, ELEMENTWISE_MODULES):
                value[node.name] = inp
            elif isinstance(mod, POOL_MODULES):
                if dim not in (None, 1):
                    raise refuse(node, "pooling over the feature axis")
                value[node.name] = inp
            elif isinstance(mod, nn.Flatten):
                value[node.name] = _flatten(node, inp, mod.start_dim, mod.end_dim, in_nd, refuse)
            else:
                raise refuse(node, f"module type {type(mod).__name__} is not understood")
        elif node.op in ("call_function", "call_method"):
            target = node.target
            tensors = [a for a in _flat(node.args) + _flat(node.kwargs) if hasattr(a, "op")]
            first = arg_value(node.args[0]) if node.args and hasattr(node.args[0], "op") else None
            if any(arg_value(a) is not None and arg_value(a)[0] == "const" for a in tensors):
                raise refuse(node, "uses a tensor attribute of the module")
            if target in ELEMENTWISE_FUNCTIONS or target in ELEMENTWISE_METHODS:
                value[node.name] = first
            elif target in POOL_FUNCTIONS:
                if first and first[1] not in (None, 1):
                    raise refuse(node, "pooling over the feature axis")
                value[node.name] = first
            elif target in ARITH or target in ("add", "mul", "sub", "add_", "div"):
                vals = [arg_value(a) for a in tensors]
                vals = [v for v in vals if v is not None]
                if not vals:
                    value[node.name] = None
                    continue
                shapes = {shape(a) for a in tensors}
                if len(vals) > 1 and (len(shapes) > 1 or len({v[1] for v in vals if v[1] is not None}) > 1):
                    raise refuse(node, "operands of different shapes or feature axes")
                gid = vals[0][0]
                for v in vals[1:]:
                    gid = uf.union(gid, v[0], f"node {node.name}")
                dims = [v[1] for v in vals if v[1] is not None]
                value[node.name] = (gid, dims[0] if dims else None)
            elif target in (torch.flatten, "flatten"):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                value[node.name] = _flatten(node, first, start, end, len(shape(node.args[0])), refuse)
            elif target in ("view", "reshape", torch.reshape):
                in_shape, out_shape = shape(node.args[0]), shape(node)
                if first is not None and uf.find(first[0]) == FIXED:
                    value[node.name] = (FIXED, None)  # reshaping a model input (never permuted) is safe
                elif len(out_shape) == 2 and out_shape[0] == in_shape[0]:
                    value[node.name] = _flatten(node, first, 1, -1, len(in_shape), refuse)
                elif out_shape == in_shape:
                    value[node.name] = first
                else:
                    raise refuse(node, "reshape other than flattening per example")
            elif target in ("size", "dim") or target is getattr:
                value[node.name] = None
            elif target in (torch.mean, "mean", torch.sum, "sum", torch.amax, "amax"):
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                in_nd = len(shape(node.args[0]))
                dims = (dims,) if isinstance(dims, int) else dims
                if first is None or dims is None or first[1] is None:
                    raise refuse(node, "reduction over all axes")
                dims = [d % in_nd for d in dims]
                if first[1] in dims or first[1] != 1:
                    raise refuse(node, "reduction over the feature axis")
                value[node.name] = first
            else:
                raise refuse(node, "operation not understood")
        else:
            raise refuse(node, "unsupported node kind")

    return _finish(uf, param_axes, state_shapes)


def _flat(obj) -> list:
    if isinstance(obj, (list, tuple)):
        return [x for o in obj for x in _flat(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _flat(o)]
    return [obj]


def _flatten(node, inp, start: int, end: int, in_nd: int, refuse):
    if inp is None:
        return None
    gid, dim = inp
    start, end = start % in_nd, end % in_nd
    if end != in_nd - 1 or start > 1:
        raise refuse(node, "flatten that does not keep the batch axis")
    if start == 0:
        if gid != FIXED:
            raise refuse(node, "flatten over the batch axis")
        return inp
    if dim not in (None, 1):
        raise refuse(node, "flatten with the feature axis not first")
    return (gid, 1)  # channel-major: each channel becomes a contiguous block


def _finish(uf: _UnionFind, param_axes: Mapping[str, list[int | None]],
            state_shapes: Mapping[str, tuple[int, ...]]) -> PermutationSpec:
    names: dict[int, str] = {}
    sizes: dict[str, int] = {}
    axes: dict[str, tuple[str | None, ...]] = {}
    for param, shp in state_shapes.items():
        row: list[str | None] = []
        for gid in param_axes.get(param, [None] * len(shp)):
            root = uf.find(gid) if gid is not None else FIXED
            if root == FIXED:
                row.append(None)
                continue
            if root not in names:
                names[root] = f"P_{uf.label[root]}"
                sizes[names[root]] = int(uf.size[root])  # type: ignore[arg-type]
            row.append(names[root])
        axes[param] = tuple(row)
    return PermutationSpec(axes, sizes)


# ---------------------------------------------------------------- transformers (by structure)

BERT_LAYER = {
    r"attention\.self\.(query|key|value)\.weight": ("heads", "res"),
    r"attention\.self\.(query|key|value)\.bias": ("heads",),
    r"attention\.output\.dense\.weight": ("res", "heads"),
    r"attention\.output\.dense\.bias": ("res",),
    r"attention\.output\.LayerNorm\.(weight|bias)": ("res",),
    r"intermediate\.dense\.weight": ("ff", "res"),
    r"intermediate\.dense\.bias": ("ff",),
    r"output\.dense\.weight": ("res", "ff"),
    r"output\.dense\.bias": ("res",),
    r"output\.LayerNorm\.(weight|bias)": ("res",),
}
BERT_OTHER = {
    r"embeddings\.(word|position|token_type)_embeddings\.weight": (None, "res"),
    r"embeddings\.LayerNorm\.(weight|bias)": ("res",),
    r"pooler\.dense\.weight": (None, "res"),
    r"pooler\.dense\.bias": (None,),
}
LLAMA_LAYER = {
    r"self_attn\.q_proj\.weight": ("qheads", "res"),
    r"self_attn\.q_proj\.bias": ("qheads",),
    r"self_attn\.(k|v)_proj\.weight": ("heads", "res"),
    r"self_attn\.(k|v)_proj\.bias": ("heads",),
    r"self_attn\.o_proj\.weight": ("res", "qheads"),
    r"self_attn\.o_proj\.bias": ("res",),
    r"mlp\.(gate|up)_proj\.weight": ("ff", "res"),
    r"mlp\.down_proj\.weight": ("res", "ff"),
    r"(input|post_attention)_layernorm\.weight": ("res",),
}
LLAMA_OTHER = {
    r"embed_tokens\.weight": (None, "res"),
    r"norm\.weight": ("res",),
}
LLAMA_TYPES = ("llama", "mistral", "qwen2")


def transformer_spec(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any],
                     residual: bool | str = "auto") -> PermutationSpec:
    """The spec of a BERT- or Llama-style transformer from tensor names/shapes and its config.json."""
    model_type = config.get("model_type")
    if model_type == "bert":
        layer_re, root = r"(.*?)encoder\.layer\.(\d+)\.(.+)", "embeddings."
        layer_rules, other_rules = BERT_LAYER, BERT_OTHER
    elif model_type in LLAMA_TYPES:
        layer_re, root = r"(.*?)layers\.(\d+)\.(.+)", "embed_tokens."
        layer_rules, other_rules = LLAMA_LAYER, LLAMA_OTHER
    else:
        raise BasinError(f"permutation spec inference does not support model_type {model_type!r} "
                         f"(supported: bert, {', '.join(LLAMA_TYPES)}); write a PermutationSpec by hand")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise BasinError(f"{model_type}: position_embedding_type {config['position_embedding_type']!r} not supported")
    hidden = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    ff = int(config["intermediate_size"])
    prefixes = {k[: k.index(root)] for k in shapes if root in k}
    if len(prefixes) != 1:
        raise BasinError(f"{model_type}: cannot locate the embeddings ({root!r}) among the tensor names")
    prefix = prefixes.pop()
    heads_only = {k for k in shapes if not k.startswith(prefix)}
    has_head = any(k.startswith(("lm_head.", "classifier.", "score.")) for k in heads_only) or (
        model_type in LLAMA_TYPES and bool(config.get("tie_word_embeddings")) and "lm_head" in str(
            config.get("architectures")))
    permute_res = has_head if residual == "auto" else bool(residual)
    sizes: dict[str, int] = {}
    axes: dict[str, tuple[str | None, ...]] = {}
    res = "P_res" if permute_res else None
    if res:
        sizes[res] = hidden
    for name, shp in shapes.items():
        rel = name[len(prefix):] if name.startswith(prefix) else None
        m = re.fullmatch(layer_re, rel) if rel is not None else None
        roles: tuple[str | None, ...] | None = None
        if m and m.group(1) == "":
            i, tail = m.group(2), m.group(3)
            for pat, r in layer_rules.items():
                if re.fullmatch(pat, tail):
                    roles = r
                    break
            groups = {"res": res, "heads": f"P_heads_{i}", "qheads": f"P_heads_{i}", "ff": f"P_ff_{i}"}
            sizes[f"P_heads_{i}"], sizes[f"P_ff_{i}"] = n_kv, ff
            if roles is not None:
                axes[name] = tuple(groups[r] if r else None for r in roles)
        elif rel is not None:
            for pat, r in other_rules.items():
                if re.fullmatch(pat, rel):
                    axes[name] = tuple(res if x == "res" else None for x in r)
                    roles = r
                    break
        else:  # task heads outside the base model
            reads_res = model_type in LLAMA_TYPES  # BERT's classifier reads the (unpermuted) pooler output
            if re.fullmatch(r"(lm_head|classifier|score)\.weight", name) and len(shp) == 2 and shp[1] == hidden:
                roles = (None, "res")
                axes[name] = (None, res if reads_res else None)
            elif re.fullmatch(r"(classifier|score)\.bias", name) or name.endswith("position_ids"):
                roles = (None,)
                axes[name] = (None,) * len(shp)
        if roles is None:
            if name.endswith(("position_ids", "token_type_ids", "inv_freq")) or "rotary" in name:
                axes[name] = (None,) * len(shp)
                continue
            raise BasinError(f"{model_type}: tensor {name!r} {shp} has a role the spec inference does not know; "
                             "refusing to guess (write a PermutationSpec by hand)")
        if len(roles) != len(shp):
            raise BasinError(f"{model_type}: tensor {name!r} has shape {shp}, expected {len(roles)} axes")
    spec = PermutationSpec(axes, {g: n for g, n in sizes.items() if any(g in a for a in axes.values())})
    spec.check({k: torch.empty(v, device="meta") for k, v in shapes.items()},
               label=f"{model_type} model")
    return spec


def spec_from_hf_folder(folder, shapes: Mapping[str, tuple[int, ...]], residual: bool | str = "auto"
                        ) -> PermutationSpec:
    """The spec of a Hugging Face checkpoint folder from its config.json and tensor shapes (no weights read)."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BasinError(f"{path}: cannot read the model config ({err})") from None
    return transformer_spec(shapes, config, residual=residual)
