"""FP8 training, applied to a built model from outside (like a parallelize step).

`train.fp8=torchao`: torchao's float8 training converts the dense projections — attention
(wq/wk/wv/wo), dense FFNs and shared experts — to float8 matmuls with dynamic scaling. Routers
(fp32 by design), the output head and layers whose sizes are not multiples of 16 stay in bf16;
routed experts keep their bf16 grouped GEMMs.
`train.fp8=te` (Transformer Engine) is recognised but not implemented yet.
"""

from __future__ import annotations

import torch
from torch import nn

from mohge.model.config import ConfigError

EXCLUDED = ("router.", "output")


def fp8_eligible(fqn: str, module: nn.Module) -> bool:
    """Which nn.Linear modules run in float8: dense projections with 16-divisible sizes."""
    if not isinstance(module, nn.Linear) or any(part in fqn for part in EXCLUDED):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_fp8(model: nn.Module, backend: str, device: torch.device, tensor_parallel: bool = False) -> int:
    """Converts eligible linears in place; returns how many. Errors name train.fp8 and the fix."""
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
    return len(converted)
