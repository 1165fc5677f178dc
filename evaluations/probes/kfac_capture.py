"""What KFAC / EKFAC read off a forward and backward pass: each layer's input features and output gradients.

A supported layer (`nn.Linear`, `nn.Conv2d` with groups=1) is a matrix product y = M a at each of its
positions (a sequence's tokens, a feature map's locations), with M = [W | b] (the weight flattened to
[out, in * kh * kw] in PyTorch's order, the bias as one more column) and a the input (for a convolution the
unfolded patch, Grosse & Martens 2016) with a 1 appended. `LayerCapture` installs forward hooks that hand each
call's features a ([B, T, cols], float64, only the columns of the selected parameters) to a callback and keep
its output, and `output_gradients` backpropagates a seed from the model's outputs to those layer outputs
([B, T, out]). `seeds` yields the seeds of the three Fisher types (Martens & Grosse 2015, Sec. 5;
Kunstner et al. 2019 for the empirical Fisher).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from evaluations.probes.curvature import vjp
from taxonomy.errors import ProbeError

SUPPORTED = (nn.Linear, nn.Conv2d)


@dataclass
class Piece:
    """One selected parameter of a layer: where it lies in the flat vector and how many columns of M it is."""

    name: str
    offset: int
    numel: int
    cols: int


@dataclass
class Layer:
    """A supported module and its selected parameters (weight, then bias: the column order of M)."""

    name: str
    module: nn.Module
    pieces: list[Piece]

    @property
    def out(self) -> int:
        return self.module.weight.shape[0]

    @property
    def cols(self) -> int:
        return sum(p.cols for p in self.pieces)

    @property
    def has_weight(self) -> bool:
        return self.pieces[0].name.endswith("weight")

    @property
    def has_bias(self) -> bool:
        return self.pieces[-1].name.endswith("bias")


def _check_module(name: str, module: nn.Module) -> None:
    if not isinstance(module, SUPPORTED):
        label = name or "<the model itself>"
        raise ProbeError(f"KFAC: module {label!r} ({type(module).__name__}) is not supported: KFAC covers nn.Linear "
                         "and nn.Conv2d layers (select their parameters with params=)")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ProbeError(f"KFAC: module {name!r} is a grouped convolution (groups={module.groups}); "
                         "only groups=1 is supported")


def _check_untied(model: nn.Module, names: list[str]) -> None:
    """A selected parameter also used under another name (tied weights) would be counted at one layer only."""
    first = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters(remove_duplicate=False):
        if first[id(p)] in names and n != first[id(p)]:
            raise ProbeError(f"KFAC: parameter {first[id(p)]!r} is tied to {n!r}; tied weights are not supported")


def layers_of(model: nn.Module, names: list[str], numels: list[int]) -> list[Layer]:
    """Group the selected parameter names by owning module (model order); a ProbeError for any other owner."""
    _check_untied(model, names)
    offsets = [0]
    for k in numels[:-1]:
        offsets.append(offsets[-1] + k)
    by_module: dict[str, Layer] = {}
    for name, offset, numel in zip(names, offsets, numels):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        _check_module(owner, module)
        if attr not in ("weight", "bias"):
            raise ProbeError(f"KFAC: parameter {name!r} is neither the weight nor the bias of its layer")
        cols = 1 if attr == "bias" else numel // module.weight.shape[0]
        layer = by_module.setdefault(owner, Layer(owner, module, []))
        layer.pieces.append(Piece(name, offset, numel, cols))
    for layer in by_module.values():
        layer.pieces.sort(key=lambda p: p.name.endswith("bias"))
    return list(by_module.values())


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> the unfolded receptive fields [B, L, C * kh * kw] (padded as the layer pads)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)
    return cols.transpose(1, 2)


def features(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as [B, T, cols] float64 rows: patches (or inputs), then a 1 for the bias."""
    module = layer.module
    if isinstance(module, nn.Conv2d):
        x = x if x.dim() == 4 else x.unsqueeze(0)
        rows = _patches(module, x.detach().double())
    else:
        x = x.reshape(1, 1, -1) if x.dim() == 1 else x
        rows = x.detach().double().reshape(x.shape[0], -1, x.shape[-1])
    parts = [rows] if layer.has_weight else []
    if layer.has_bias:
        parts.append(rows.new_ones(*rows.shape[:2], 1))
    return torch.cat(parts, dim=2)


def gradient_rows(layer: Layer, g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A layer-output gradient as [B, T, out] float64 rows (zeros where the output did not reach the loss)."""
    g = torch.zeros_like(like) if g is None else g
    if isinstance(layer.module, nn.Conv2d):
        g = g if g.dim() == 4 else g.unsqueeze(0)
        return g.double().flatten(2).transpose(1, 2)
    g = g.reshape(1, 1, -1) if g.dim() == 1 else g
    return g.double().reshape(g.shape[0], -1, g.shape[-1])


class LayerCapture:
    """Forward hooks on the layers: `on_features(index, a)` per call, outputs kept for `output_gradients`.

    Each hook returns a clone of the layer's output, so an in-place operation after the layer (ReLU(inplace))
    leaves the kept output, and the gradient with respect to it, intact."""

    def __init__(self, layers: list[Layer], on_features: Callable[[int, torch.Tensor], None]):
        self.layers, self.on_features = layers, on_features
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        self.calls = [0] * len(layers)
        self.handles: list = []

    def __enter__(self) -> LayerCapture:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.module.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            self.calls[i] += 1
            self.on_features(i, features(self.layers[i], inputs[0]))
            self.outputs[i] = output
            return output.clone()

        return hook

    def check_calls(self) -> None:
        """Each layer must run exactly once per forward pass (its weight shared by no other call)."""
        for layer, calls in zip(self.layers, self.calls):
            if calls == 0:
                raise ProbeError(f"KFAC: module {layer.name!r} was not called by the forward pass (its weight is "
                                 "used directly, e.g. inside nn.MultiheadAttention); deselect it with params=")
            if calls > 1:
                raise ProbeError(f"KFAC: module {layer.name!r} is called {calls} times per forward pass; "
                                 "a layer applied more than once is not supported")

    def output_gradients(self, outputs: torch.Tensor, seed: torch.Tensor) -> list[torch.Tensor]:
        """Backpropagate `seed` (d loss / d outputs) to every layer's output -> [B, T, out] float64 each."""
        if not outputs.requires_grad:
            raise ProbeError("KFAC: the objective's outputs do not depend on the selected parameters "
                             "(is predict running under torch.no_grad?)")
        live = [i for i, o in enumerate(self.outputs) if o.requires_grad]
        found = vjp([outputs], [self.outputs[i] for i in live], [seed.to(outputs.dtype)], retain_graph=True)
        grads: list[torch.Tensor | None] = [None] * len(self.outputs)
        for i, g in zip(live, found):
            grads[i] = g
        return [gradient_rows(layer, g, o) for layer, g, o in zip(self.layers, grads, self.outputs)]


def _class_targets(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy targets as [n, C] probabilities: class indices one-hot, or soft targets as given."""
    n, classes = logits.shape
    if targets.is_floating_point() and targets.shape == logits.shape:
        return targets.detach().double()
    if targets.dim() != 1 or len(targets) != n or targets.is_floating_point():
        raise ProbeError(f"KFAC: cross-entropy targets of shape {tuple(targets.shape)} do not fit the outputs' "
                         f"{(n, classes)}")
    if len(targets) and (targets.min() < 0 or targets.max() >= classes):
        raise ProbeError(f"KFAC: a cross-entropy target is outside [0, {classes}) (ignored rows are not supported)")
    return F.one_hot(targets, classes).double()


def _ce_seeds(p: torch.Tensor, fisher_type: str, targets: torch.Tensor, gen: torch.Generator,
              mc_samples: int) -> Iterator[torch.Tensor]:
    """Cross-entropy: columns of sqrt(diag(p) - p p^T) = sqrt(p_c)(e_c - p); sampled p - e_y; p - target."""
    if fisher_type == "type-2":
        for c in range(p.shape[1]):
            onehot = torch.zeros_like(p)
            onehot[:, c] = 1.0
            yield p[:, c : c + 1].sqrt() * (onehot - p)
    elif fisher_type == "mc":
        for _ in range(mc_samples):
            y = torch.multinomial(p.cpu(), 1, generator=gen).squeeze(1).to(p.device)
            yield p - F.one_hot(y, p.shape[1]).double()
    else:
        yield p - targets


def _mse_seeds(f: torch.Tensor, fisher_type: str, targets: torch.Tensor, gen: torch.Generator,
               mc_samples: int) -> Iterator[torch.Tensor]:
    """Mean squared error over k outputs per row: output Hessian (2/k) I; sqrt(2/k) e_c, sqrt(2/k) N(0, I), or
    the gradient (2/k)(f - y)."""
    k = f.shape[1]
    if fisher_type == "type-2":
        for c in range(k):
            seed = torch.zeros_like(f)
            seed[:, c] = math.sqrt(2.0 / k)
            yield seed
    elif fisher_type == "mc":
        for _ in range(mc_samples):
            yield math.sqrt(2.0 / k) * torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)
    else:
        if targets.shape != f.shape:
            raise ProbeError(f"KFAC: mse targets of shape {tuple(targets.shape)} do not fit outputs {tuple(f.shape)}")
        yield (2.0 / k) * (f - targets.detach().double())


def seeds(loss: str, fisher_type: str, outputs: torch.Tensor, targets: torch.Tensor, gen: torch.Generator,
          mc_samples: int) -> Iterator[torch.Tensor]:
    """The output-gradient seeds s (float64 [n, C]) whose sum of J^T s s^T J is the Fisher/GGN of the rows' losses."""
    f = outputs.detach().double()
    if loss == "cross_entropy":
        p = torch.softmax(f, dim=1)
        wanted = _class_targets(targets, f) if fisher_type == "empirical" else targets
        return _ce_seeds(p, fisher_type, wanted, gen, mc_samples)
    return _mse_seeds(f, fisher_type, targets, gen, mc_samples)
