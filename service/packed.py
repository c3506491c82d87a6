"""Linear layers on weights prepacked once for oneDNN, for float32 on a CPU.

Why: MKL's sgemm repacks the weight matrix on every call of more than one
row, so a verify pass of K+1 rows paid for a repack of every weight it
touched -- on a 2-core AVX2 EPYC a 5-row forward of the default model cost
114 ms against 57 ms for one row. The prepacked oneDNN kernel skips that
(80 ms for 5 rows, 55 ms for one; `benchmarks.forward_cost`), and it computes
each row the same whatever the row count, where MKL's results differ in the
last bits between a one-row and a many-row call. One exception, found by
tests/test_batching.py: for some shapes (the MLP's down projection, 1536
inputs, on an AVX2 EPYC) oneDNN's one-row kernel sums in another order than
its many-row one. Each packed layer probes this once when packed and, where
they differ, runs a one-row call as two rows, so a row's result never depends
on the batch (the batched serving loop's output equals single-stream output).

`pack_linears(model)` first fuses each frozen decoder layer's q/k/v and
gate/up projections into one GEMM each (`fuse_projections`), then swaps every
remaining `nn.Linear` of the target for a
`PackedLinear` that keeps its `weight` Parameter (shared tensors such as a
tied LM head stay shared) and falls back to `F.linear` wherever the packed
kernel does not apply: other dtypes or devices, autograd, or after `.to()`
moved the weight (the packing follows `_apply`, and an in-place update of
the weight, e.g. an optimizer step on a head a drafter wraps, repacks it)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .llama import MLP, Attention

# What a measured cost curve was taken on (`service.costmodel.curve_key`): a
# curve cached before the projections were fused is not this kernel's.
KERNELS = "onednn-packed+fused-qkv-gate-up"


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packed_linear(x: Tensor, packed: Tensor) -> Tensor:
    """x: (M, in) float32 -> (M, out) through oneDNN's prepacked kernel."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _one_row_differs(packed: Tensor, in_features: int) -> bool:
    """Whether a one-row call computes a row otherwise than a many-row call."""
    probe = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0))  # (3, in)
    with torch.no_grad():
        return not torch.equal(_packed_linear(probe[:1], packed), _packed_linear(probe, packed)[:1])


def _stamp(weight: Tensor) -> tuple[int, int]:
    """What changes when the weight does: its storage and its in-place version."""
    try:
        return weight.data_ptr(), weight._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter (and cannot change in place)
        return weight.data_ptr(), -1


def _packable(weight: Tensor) -> bool:
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and not weight.is_meta and packing_available()


def _pack(weight: Tensor) -> Tensor | None:
    """The oneDNN layout of a float32 CPU weight (None: the plain path applies)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None) if _packable(weight) else None


class PackedLinear(nn.Module):
    """`nn.Linear` (no bias) whose float32 CPU forward uses a prepacked weight."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # (out, in), shared with the module it replaces
        self.out_features, self.in_features = weight.shape
        self._repack()

    def _repack(self) -> None:
        self._packed = _pack(self.weight)
        self._pad_one_row = self._packed is not None and _one_row_differs(self._packed, self.in_features)
        self._stamp = _stamp(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self._packed is None or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.weight)
        if _stamp(self.weight) != self._stamp:  # updated in place since it was packed
            self._repack()
        packed = self._packed
        if packed is None:
            return F.linear(x, self.weight)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if self._pad_one_row and rows.shape[0] == 1:  # the many-row kernel, so the row matches a batch's
            return _packed_linear(rows.expand(2, -1).contiguous(), packed)[:1].view(*lead, self.out_features)
        return _packed_linear(rows, packed).view(*lead, self.out_features)

    def _apply(self, fn, recurse: bool = True):  # .to() / .float() / .cuda(): repack or drop
        super()._apply(fn, recurse)
        self._repack()
        return self

    def __deepcopy__(self, memo: dict) -> PackedLinear:  # the opaque packed tensor cannot be copied
        return PackedLinear(copy.deepcopy(self.weight, memo))

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, packed={self._packed is not None}, pad_one_row={self._pad_one_row}"


# module class -> (its fused projection's attribute, the projections it replaces)
FUSED_GROUPS: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    Attention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    MLP: ("gate_up_proj", ("gate_proj", "up_proj")),
}


def _superseded(parent: nn.Module) -> tuple[str, ...]:
    """The projections of `parent` a fused one does the work of (none if unfused)."""
    group = FUSED_GROUPS.get(type(parent))
    return group[1] if group is not None and getattr(parent, group[0]) is not None else ()


def pack_linears(model: nn.Module, fuse: bool = True) -> int:
    """Replace every bias-free `nn.Linear` under `model` with a `PackedLinear` on
    the same weight, where the weight is float32 on a CPU, after fusing the
    frozen q/k/v and gate/up groups (`fuse_projections`; `fuse=False` keeps
    them apart, for comparison) -> how many were packed."""
    if not packing_available():
        return 0
    if fuse:
        fuse_projections(model)
    swapped = 0
    for parent in list(model.modules()):
        superseded = _superseded(parent)  # a fused projection does their work
        for name, child in list(parent.named_children()):
            weight = child.weight if type(child) is nn.Linear and child.bias is None else None
            if weight is not None and name not in superseded and _packable(weight):
                setattr(parent, name, PackedLinear(child.weight))
                swapped += 1
    return swapped


def _fuse(parent: nn.Module, names: tuple[str, ...]) -> PackedLinear:
    """One linear over the concatenated weights of `parent`'s `names` (in that
    order); each original becomes a plain `nn.Linear` on a view of the fused
    weight, so the weights are held once and `state_dict` keeps its names."""
    linears = [getattr(parent, n) for n in names]
    fused_weight = torch.cat([lin.weight.detach() for lin in linears])  # (sum of outs, in)
    row = 0
    for name, lin in zip(names, linears):
        part = nn.Linear(lin.in_features, lin.out_features, bias=False, device="meta")
        part.weight = nn.Parameter(fused_weight[row : row + lin.out_features], requires_grad=False)
        row += lin.out_features
        setattr(parent, name, part)
    return PackedLinear(nn.Parameter(fused_weight, requires_grad=False))


def fuse_projections(model: nn.Module) -> int:
    """q/k/v, and gate/up, of every *frozen* bias-free decoder layer of a target
    in one GEMM each -> how many groups were fused.

    Why: on a CPU a forward of a few rows is a run of small GEMMs, each paying
    a call and a pass over its input; one wider GEMM per group reads the same
    weight bytes with 3 fewer calls per layer (`benchmarks.forward_cost`,
    docs/results.md). The fused output columns are the separate GEMMs' columns
    (same inputs, same reduction length; checked bit for bit in
    tests/test_packed.py). Only frozen modules: a trainable head's gradients must
    reach its own Parameters, so a drafter's MLP is never fused."""
    fused = 0
    for module in list(model.modules()):
        group = FUSED_GROUPS.get(type(module))
        if group is None or getattr(module, group[0]) is not None:
            continue
        attr, names = group
        weights = [getattr(module, n).weight for n in names]
        biased = any(getattr(getattr(module, n), "bias", None) is not None for n in names)
        if biased or any(not _packable(w) or w.requires_grad for w in weights):  # float32 CPU, frozen
            continue
        setattr(module, attr, _fuse(module, names))
        fused += 1
    return fused


def unfuse_projections(model: nn.Module) -> None:
    """Back to the separate projections (views of the fused weights), for comparison."""
    for module in model.modules():
        group = FUSED_GROUPS.get(type(module))
        if group is not None:
            setattr(module, group[0], None)


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) and m._packed is not None for m in model.modules())
