"""FP8 training, applied to a built model from outside (like a parallelize step).

`train.fp8=torchao`: torchao's float8 training converts the dense projections — attention
(wq/wk/wv/wo), dense FFNs and shared experts — to float8 matmuls with dynamic scaling. Routers
(fp32 by design), the output head and layers whose sizes are not multiples of 16 stay in bf16.
With `train.fp8_experts=true` the routed experts' grouped GEMMs run in float8 too, through
torchao's rowwise-scaled grouped GEMM (prototype, Hopper or newer): each expert's token segment is
zero-padded to the kernel's 16-row alignment, and the group's widths must be multiples of 16.
Otherwise routed experts keep their bf16 grouped GEMMs.
`train.fp8=te` (Transformer Engine) is recognised but not implemented yet.
"""

from __future__ import annotations

import torch
from torch import nn

from mohge.model.config import ConfigError
from mohge.model.moe.experts import GroupedExperts, LoopExperts, RaggedExperts

EXCLUDED = ("router.", "output")


def fp8_eligible(fqn: str, module: nn.Module) -> bool:
    """Which nn.Linear modules run in float8: dense projections with 16-divisible sizes."""
    if not isinstance(module, nn.Linear) or any(part in fqn for part in EXCLUDED):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


FP8_ALIGN = 16  # rows per expert segment, and K/N divisibility, of torchao's float8 grouped GEMM


def float8_grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The experts' grouped GEMM with dynamic rowwise float8 scaling (torchao), bf16 out."""
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    return _to_fp8_rowwise_then_scaled_grouped_mm(x, w_t, offs, out_dtype=torch.bfloat16,
                                                  pad_token_groups_for_grouped_mm=False)


def apply_fp8_experts(model: nn.Module) -> int:
    """Points every layer's routed-expert grouped GEMM at the float8 kernel; returns how many.
    Needs the grouped expert path and 16-divisible widths (errors name the field)."""
    try:
        import torchao.prototype.moe_training  # noqa: F401
    except ImportError as err:
        raise ConfigError("train.fp8_experts: torchao's moe_training is not importable "
                          f"({err}); pip install 'mohge[torchao]' or set train.fp8_experts=false") from err
    converted = 0
    for name, module in model.named_modules():
        if isinstance(module, (LoopExperts, RaggedExperts)):
            raise ConfigError("train.fp8_experts: needs model.moe.expert_compute=grouped (or auto on CUDA), "
                              f"but {name} uses {type(module).__name__}")
        if not isinstance(module, GroupedExperts):
            continue
        d_model = module.d_model
        for width in module.widths:  # the transient padded stacks are aligned when every width is
            if width % FP8_ALIGN or d_model % FP8_ALIGN:
                raise ConfigError(f"train.fp8_experts: {name} has ffn_hidden_size {width} and d_model {d_model}; "
                                  f"float8 grouped GEMMs need multiples of {FP8_ALIGN} "
                                  "(change model.moe.groups or set train.fp8_experts=false)")
        module.gemm, module.align = float8_grouped_mm, FP8_ALIGN
        converted += 1
    return converted


def apply_fp8(model: nn.Module, backend: str, device: torch.device, tensor_parallel: bool = False,
              experts: bool = False) -> int:
    """Converts eligible linears (and, with `experts`, the routed experts' grouped GEMMs) in
    place; returns how many linears. Errors name train.fp8 and the fix."""
    if backend == "none":
        return 0
    if device.type != "cuda":
        raise ConfigError(f"train.fp8={backend}: FP8 needs a CUDA GPU (Hopper or newer); use train.fp8=none on CPU")
    if backend == "te":
        try:
            import transformer_engine.pytorch  # noqa: F401
        except (ImportError, RuntimeError, OSError) as err:  # TE raises RuntimeError without CUDA libraries
            raise ConfigError(f"train.fp8=te: Transformer Engine is not importable ({err}); install "
                              "'mohge[te]' or use train.fp8=torchao") from err
        raise ConfigError("train.fp8=te: the Transformer Engine path is not implemented yet; use train.fp8=torchao")
    if tensor_parallel:
        raise ConfigError("train.fp8=torchao: not supported together with parallel.tp > 1 yet")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ConfigError("train.fp8=torchao: torchao is not installed; pip install 'mohge[torchao]'") from err
    converted = [name for name, m in model.named_modules() if fp8_eligible(name, m)]
    convert_to_float8_training(model, module_filter_fn=fp8_eligible)
    if experts:
        apply_fp8_experts(model)
    return len(converted)
