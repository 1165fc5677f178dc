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
from dataclasses import dataclass
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


def _traced(model: nn.Module, example_input: Any):
    """`model` traced by torch.fx, each node's output shape recorded from one run of the example input."""
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
    return gm


def fx_spec(model: nn.Module, example_input: Any = None) -> PermutationSpec:
    """Trace `model` with torch.fx and infer its spec (see the module docstring)."""
    gm = _traced(model, example_input)
    flow = _FeatureFlow(gm, model)
    for node in gm.graph.nodes:
        flow.visit(node)
    return _finish(flow.uf, flow.param_axes, flow.state_shapes)


def _shape(node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()


Value = tuple  # (group id, feature dim or None), or ("const",) for a tensor attribute; None: not a tensor


class _FeatureFlow:
    """Each graph value's feature group and axis, followed node by node (Git Re-Basin, section 3.1)."""

    def __init__(self, gm, model: nn.Module) -> None:
        self.name = type(model).__name__
        self.gm = gm
        self.uf = _UnionFind()
        self.value: dict[str, Value | None] = {}  # node -> (group id, feature dim) or None (non-tensor)
        self.param_axes: dict[str, list[int | None]] = {}  # param -> per-axis group id
        self.modules = dict(gm.named_modules())
        self.state_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # --- shared steps
    def assign(self, param: str, axis: int, gid: int | None) -> None:
        axes = self.param_axes.setdefault(param, [None] * len(self.state_shapes[param]))
        if gid is None:
            return
        if axes[axis] is None:
            axes[axis] = gid
        else:
            axes[axis] = self.uf.union(axes[axis], gid, f"parameter {param!r} (shared weights)")

    def refuse(self, node, why: str) -> BasinError:
        return BasinError(f"{self.name}: cannot prove a permutation safe at graph node {node.name!r} "
                          f"({node.op} {node.target}): {why}; write a PermutationSpec by hand")

    def arg_value(self, a) -> Value | None:
        return self.value.get(a.name) if hasattr(a, "name") and a.name in self.value else None

    def visit(self, node) -> None:
        """Record the value of one graph node (or refuse it)."""
        visitors = {"placeholder": self._placeholder, "get_attr": self._get_attr, "output": self._output,
                    "call_module": self._call_module, "call_function": self._call, "call_method": self._call}
        if node.op not in visitors:
            raise self.refuse(node, "unsupported node kind")
        visitors[node.op](node)

    # --- node kinds
    def _placeholder(self, node) -> None:
        self.value[node.name] = (FIXED, None)

    def _get_attr(self, node) -> None:
        self.value[node.name] = None
        if isinstance(getattr(self.gm, str(node.target), None), torch.Tensor):
            self.value[node.name] = ("const",)

    def _output(self, node) -> None:
        for a in _flat(node.args):
            v = self.arg_value(a)
            if v and v[0] != "const":
                self.uf.union(v[0], FIXED, "output")

    def _call_module(self, node) -> None:
        mod = self.modules[node.target]
        inp = self.arg_value(node.args[0]) if node.args else None
        if inp is None or inp[0] == "const" or len(node.args) != 1 or node.kwargs:
            raise self.refuse(node, "module called with unsupported arguments")
        for types, rule in MODULE_RULES:
            if isinstance(mod, types):
                self.value[node.name] = rule(self, node, mod, inp)
                return
        raise self.refuse(node, f"module type {type(mod).__name__} is not understood")

    def _call(self, node) -> None:
        tensors = [a for a in _flat(node.args) + _flat(node.kwargs) if hasattr(a, "op")]
        first = self.arg_value(node.args[0]) if node.args and hasattr(node.args[0], "op") else None
        if any(self.arg_value(a) is not None and self.arg_value(a)[0] == "const" for a in tensors):
            raise self.refuse(node, "uses a tensor attribute of the module")
        for targets, rule in FUNCTION_RULES:
            if node.target in targets:
                self.value[node.name] = rule(self, node, first, tensors)
                return
        raise self.refuse(node, "operation not understood")

    # --- modules: each returns the value of its output
    def _layer(self, node, width: int, gid: int, bias: bool, out_dim: int) -> Value:
        """A Linear/Conv: its output is a new group (weight rows, bias), its input group its weight columns."""
        out = self.uf.new(width, node.target)
        self.assign(f"{node.target}.weight", 0, out)
        self.assign(f"{node.target}.weight", 1, gid)
        if bias:
            self.assign(f"{node.target}.bias", 0, out)
        return (out, out_dim)

    def _per_feature(self, node, params: tuple[str, ...], gid: int) -> None:
        for p in params:
            if f"{node.target}.{p}" in self.state_shapes:
                self.assign(f"{node.target}.{p}", 0, gid)

    def _linear(self, node, mod: nn.Linear, inp: Value) -> Value:
        if inp[1] not in (None, len(_shape(node.args[0])) - 1):
            raise self.refuse(node, "Linear applied to an axis that is not the feature axis")
        return self._layer(node, mod.out_features, inp[0], mod.bias is not None, len(_shape(node)) - 1)

    def _conv(self, node, mod: nn.Conv1d, inp: Value) -> Value:
        if mod.groups != 1:
            raise self.refuse(node, "grouped/depthwise convolution")
        if inp[1] not in (None, 1):
            raise self.refuse(node, "convolution over an axis that is not the channel axis")
        return self._layer(node, mod.out_channels, inp[0], mod.bias is not None, 1)

    def _batch_norm(self, node, mod: nn.BatchNorm1d, inp: Value) -> Value:
        if inp[1] not in (None, 1):
            raise self.refuse(node, "BatchNorm over an axis that is not the channel axis")
        self._per_feature(node, ("weight", "bias", "running_mean", "running_var"), inp[0])
        return (inp[0], 1)

    def _norm(self, node, mod: nn.LayerNorm, inp: Value) -> Value:
        if len(mod.normalized_shape) != 1 or inp[1] not in (None, len(_shape(node.args[0])) - 1):
            raise self.refuse(node, "norm over more than the feature axis")
        self._per_feature(node, ("weight", "bias"), inp[0])
        return inp

    def _carry(self, node, mod: nn.Module, inp: Value) -> Value:
        return inp

    def _pool(self, node, mod: nn.Module, inp: Value) -> Value:
        if inp[1] not in (None, 1):
            raise self.refuse(node, "pooling over the feature axis")
        return inp

    def _flatten_module(self, node, mod: nn.Flatten, inp: Value) -> Value | None:
        return _flatten(node, inp, mod.start_dim, mod.end_dim, len(_shape(node.args[0])), self.refuse)

    # --- functions and methods: each returns the value of its output
    def _keep(self, node, first: Value | None, tensors: list) -> Value | None:
        return first

    def _pool_function(self, node, first: Value | None, tensors: list) -> Value | None:
        if first and first[1] not in (None, 1):
            raise self.refuse(node, "pooling over the feature axis")
        return first

    def _arith(self, node, first: Value | None, tensors: list) -> Value | None:
        """Elementwise arithmetic: the operands' groups are one (a residual add joins them)."""
        vals = [v for v in (self.arg_value(a) for a in tensors) if v is not None]
        if not vals:
            return None
        shapes = {_shape(a) for a in tensors}
        if len(vals) > 1 and (len(shapes) > 1 or len({v[1] for v in vals if v[1] is not None}) > 1):
            raise self.refuse(node, "operands of different shapes or feature axes")
        gid = vals[0][0]
        for v in vals[1:]:
            gid = self.uf.union(gid, v[0], f"node {node.name}")
        dims = [v[1] for v in vals if v[1] is not None]
        return (gid, dims[0] if dims else None)

    def _flatten_function(self, node, first: Value | None, tensors: list) -> Value | None:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten(node, first, start, end, len(_shape(node.args[0])), self.refuse)

    def _reshape(self, node, first: Value | None, tensors: list) -> Value | None:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if first is not None and self.uf.find(first[0]) == FIXED:
            return (FIXED, None)  # reshaping a model input (never permuted) is safe
        if len(out_shape) == 2 and out_shape[0] == in_shape[0]:
            return _flatten(node, first, 1, -1, len(in_shape), self.refuse)
        if out_shape == in_shape:
            return first
        raise self.refuse(node, "reshape other than flattening per example")

    def _not_tensor(self, node, first: Value | None, tensors: list) -> None:
        return None

    def _reduce(self, node, first: Value | None, tensors: list) -> Value:
        """mean/sum/amax over spatial axes only (the channel axis 1 stays)."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        in_nd = len(_shape(node.args[0]))
        dims = (dims,) if isinstance(dims, int) else dims
        if first is None or dims is None or first[1] is None:
            raise self.refuse(node, "reduction over all axes")
        dims = [d % in_nd for d in dims]
        if first[1] in dims or first[1] != 1:
            raise self.refuse(node, "reduction over the feature axis")
        return first


# the first rule whose types (modules) or targets (functions, method names) match applies
MODULE_RULES = (
    (nn.Linear, _FeatureFlow._linear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _FeatureFlow._conv),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _FeatureFlow._batch_norm),
    ((nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)), _FeatureFlow._norm),
    (ELEMENTWISE_MODULES, _FeatureFlow._carry),
    (POOL_MODULES, _FeatureFlow._pool),
    (nn.Flatten, _FeatureFlow._flatten_module),
)
FUNCTION_RULES = (
    (ELEMENTWISE_FUNCTIONS | ELEMENTWISE_METHODS, _FeatureFlow._keep),
    (POOL_FUNCTIONS, _FeatureFlow._pool_function),
    (ARITH | {"add", "mul", "sub", "add_", "div"}, _FeatureFlow._arith),
    ((torch.flatten, "flatten"), _FeatureFlow._flatten_function),
    (("view", "reshape", torch.reshape), _FeatureFlow._reshape),
    (("size", "dim", getattr), _FeatureFlow._not_tensor),
    ((torch.mean, "mean", torch.sum, "sum", torch.amax, "amax"), _FeatureFlow._reduce),
)


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


@dataclass(frozen=True)
class _Layout:
    """What the spec inference needs to know of one transformer: its naming rules and group sizes."""
    model_type: str
    layer_re: str
    layer_rules: Mapping[str, tuple[str | None, ...]]
    other_rules: Mapping[str, tuple[str | None, ...]]
    prefix: str  # of the base model's tensors ("" or e.g. "bert.")
    res: str | None  # the residual stream's group, None when it is fixed
    hidden: int
    n_kv: int
    ff: int


def _naming(config: Mapping[str, Any]) -> tuple[str, str, str, Mapping, Mapping]:
    """model_type, the block-name pattern, the embeddings' name and the rules of a supported family."""
    model_type = config.get("model_type")
    if model_type == "bert":
        naming = (model_type, r"(.*?)encoder\.layer\.(\d+)\.(.+)", "embeddings.", BERT_LAYER, BERT_OTHER)
    elif model_type in LLAMA_TYPES:
        naming = (model_type, r"(.*?)layers\.(\d+)\.(.+)", "embed_tokens.", LLAMA_LAYER, LLAMA_OTHER)
    else:
        raise BasinError(f"permutation spec inference does not support model_type {model_type!r} "
                         f"(supported: bert, {', '.join(LLAMA_TYPES)}); write a PermutationSpec by hand")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise BasinError(f"{model_type}: position_embedding_type {config['position_embedding_type']!r} not supported")
    return naming


def _layout(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], residual: bool | str) -> _Layout:
    model_type, layer_re, root, layer_rules, other_rules = _naming(config)
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
    return _Layout(model_type, layer_re, layer_rules, other_rules, prefix, "P_res" if permute_res else None,
                   hidden, n_kv, ff)


def transformer_spec(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any],
                     residual: bool | str = "auto") -> PermutationSpec:
    """The spec of a BERT- or Llama-style transformer from tensor names/shapes and its config.json."""
    lay = _layout(shapes, config, residual)
    sizes: dict[str, int] = {lay.res: lay.hidden} if lay.res else {}
    axes: dict[str, tuple[str | None, ...]] = {}
    for name, shp in shapes.items():
        roles = _roles(lay, name, shp, axes, sizes)
        if roles is None:
            if name.endswith(("position_ids", "token_type_ids", "inv_freq")) or "rotary" in name:
                axes[name] = (None,) * len(shp)
                continue
            raise BasinError(f"{lay.model_type}: tensor {name!r} {shp} has a role the spec inference does not "
                             "know; refusing to guess (write a PermutationSpec by hand)")
        if len(roles) != len(shp):
            raise BasinError(f"{lay.model_type}: tensor {name!r} has shape {shp}, expected {len(roles)} axes")
    spec = PermutationSpec(axes, {g: n for g, n in sizes.items() if any(g in a for a in axes.values())})
    spec.check({k: torch.empty(v, device="meta") for k, v in shapes.items()},
               label=f"{lay.model_type} model")
    return spec


def _roles(lay: _Layout, name: str, shp: tuple[int, ...], axes: dict[str, tuple[str | None, ...]],
           sizes: dict[str, int]) -> tuple[str | None, ...] | None:
    """The roles of tensor `name`'s axes (None: unknown), its groups recorded in `axes` and `sizes`."""
    rel = name[len(lay.prefix):] if name.startswith(lay.prefix) else None
    if rel is None:  # task heads outside the base model
        return _head_roles(lay, name, shp, axes)
    m = re.fullmatch(lay.layer_re, rel)
    if m and m.group(1) == "":
        return _block_roles(lay, name, m.group(2), m.group(3), axes, sizes)
    for pat, r in lay.other_rules.items():
        if re.fullmatch(pat, rel):
            axes[name] = tuple(lay.res if x == "res" else None for x in r)
            return r
    return None


def _block_roles(lay: _Layout, name: str, i: str, tail: str, axes: dict[str, tuple[str | None, ...]],
                 sizes: dict[str, int]) -> tuple[str | None, ...] | None:
    """A tensor of block `i`: the residual stream, the block's heads and its MLP hidden units."""
    roles = next((r for pat, r in lay.layer_rules.items() if re.fullmatch(pat, tail)), None)
    groups = {"res": lay.res, "heads": f"P_heads_{i}", "qheads": f"P_heads_{i}", "ff": f"P_ff_{i}"}
    sizes[f"P_heads_{i}"], sizes[f"P_ff_{i}"] = lay.n_kv, lay.ff
    if roles is not None:
        axes[name] = tuple(groups[r] if r else None for r in roles)
    return roles


def _head_roles(lay: _Layout, name: str, shp: tuple[int, ...], axes: dict[str, tuple[str | None, ...]]
                ) -> tuple[str | None, ...] | None:
    """A task head's tensor: Llama's heads read the residual stream, BERT's classifier the (fixed) pooler."""
    reads_res = lay.model_type in LLAMA_TYPES
    if re.fullmatch(r"(lm_head|classifier|score)\.weight", name) and len(shp) == 2 and shp[1] == lay.hidden:
        axes[name] = (None, lay.res if reads_res else None)
        return (None, "res")
    if re.fullmatch(r"(classifier|score)\.bias", name) or name.endswith("position_ids"):
        axes[name] = (None,) * len(shp)
        return (None,)
    return None


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
