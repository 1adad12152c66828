"""Initialisation by shard: every process generates only the elements it holds.

A parameter's initial value is a function of (seed, parameter name, global element index): a
counter-based generator (splitmix64 hash -> two uniforms -> Box-Muller) instead of a sequential
stream, so any part of a tensor is generated on its own with the values it has in the whole
tensor. Expert parallel keeps `expert_rows` of the whole [N, ...] tensor (rows are global expert
ids within the group); tensor parallel and FSDP hold DTensor shards, whose global indices are read
off the DTensor's own placements. Every layout therefore starts from the same weights, and a rank
of ep=8 x FSDP generates 1/8 of the expert elements divided by its FSDP share, plus its share of
the dense ones.

Shape legend: n elements generated in one chunk.
"""

from __future__ import annotations

import math
import zlib

import torch

CHUNK = {"cpu": 1 << 18}  # elements generated at once by device type (cache-sized temporaries on CPU)
CHUNK_DEFAULT = 1 << 24
_M64 = (1 << 64) - 1


def _s64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    value &= _M64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 output function of state x (wrapping int64 arithmetic), in place on x."""
    x.add_(_GOLDEN)
    x.bitwise_xor_(_shr(x, 30)).mul_(_MIX1)
    x.bitwise_xor_(_shr(x, 27)).mul_(_MIX2)
    return x.bitwise_xor_(_shr(x, 31))


def _mix_scalar(value: int) -> int:
    """splitmix64 of one Python int (the per-tensor key offset)."""
    z = (value + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def param_key(name: str, seed: int) -> int:
    """The generator key of one parameter (as the per-name seeds before init by shard)."""
    return _s64(_mix_scalar(seed * 1_000_003 + zlib.crc32(name.encode())))


def normal_at(key: int, index_n: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) values (fp32) at global element indices `index_n` of the tensor keyed `key`:
    one splitmix64 hash of (key + index) per element; its high and low 24 bits are the two
    uniforms of a Box-Muller transform (2^-24 resolution: tails to 5.8 std)."""
    h = splitmix64(index_n + key)
    u1 = _shr(h, 40).float().add_(1.0).mul_(2.0 ** -24)  # (0, 1]
    u2 = h.bitwise_and_(0xFFFFFF).float().mul_(2.0 * math.pi * 2.0 ** -24)  # [0, 2 pi)
    return u1.log_().mul_(-2.0).sqrt_().mul_(u2.cos_()).mul_(std)


def global_index_vectors(param: torch.Tensor, rows: list[int] | None) -> list[torch.Tensor]:
    """For each dimension of `param`'s local data, the global indices it covers (`rows`: the
    whole tensor's dim-0 rows this module keeps, under expert parallel)."""
    shape = tuple(param.shape)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        vectors = []
        for d, n in enumerate(shape):
            view = [1] * len(shape)
            view[d] = n
            full = torch.arange(n).view(view).expand(shape)  # no copy: stride 0 off dimension d
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            index = tuple(slice(None) if e == d else 0 for e in range(len(shape)))
            vectors.append(local[index].clone() if local.numel() else torch.zeros(0, dtype=torch.long))
    else:
        vectors = [torch.arange(n) for n in shape]
    if rows is not None:
        vectors[0] = torch.tensor(rows, dtype=torch.long)[vectors[0]]
    return vectors


def fill_local(param: torch.Tensor, key: int, std: float | None, whole_shape: tuple[int, ...],
               rows: list[int] | None = None) -> int:
    """Writes the local part of the parameter's initial value (std None: ones) into `param`, whose
    whole tensor has `whole_shape`; returns the number of elements generated (its local size)."""
    local = param.to_local() if hasattr(param, "device_mesh") else param
    if local.numel() == 0:
        return 0
    if std is None:
        local.fill_(1.0)
        return local.numel()
    return fill_indexed(local, key, std, whole_shape, global_index_vectors(param, rows))


def fill_indexed(out: torch.Tensor, key: int, std: float, whole_shape: tuple[int, ...],
                 vectors: list[torch.Tensor]) -> int:
    """Writes into `out` the values of the whole tensor (`whole_shape`, keyed `key`) at the
    global indices `vectors[d]` along each dimension d (out.shape[d] == len(vectors[d])). Also for
    a view of a packed layout: e.g. one expert's rows of a fused stack, drawn under its own
    per-expert tensor's key and shape. Returns the number of elements generated."""
    assert out.dim() >= 1, "0-dim parameters are not generated by shard"
    nd, device = out.dim(), out.device
    strides = [math.prod(whole_shape[d + 1:]) for d in range(nd)]
    # Flat global index of every element: dims 1.. broadcast once, dim 0 a block at a time.
    rest = torch.zeros([1] * (nd - 1), dtype=torch.long)
    for d in range(1, nd):
        view = [1] * (nd - 1)
        view[d - 1] = -1
        rest = rest + (vectors[d] * strides[d]).view(view)
    rest, first = rest.to(device), (vectors[0] * strides[0]).to(device)
    step = max(1, CHUNK.get(device.type, CHUNK_DEFAULT) // max(1, rest.numel()))
    for start in range(0, first.shape[0], step):
        index = first[start : start + step].view(-1, *([1] * (nd - 1))) + rest
        out[start : start + step].copy_(normal_at(key, index, std).to(out.dtype))
    return out.numel()
