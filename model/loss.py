"""Output projection + cross-entropy in chunks of tokens, so the [tokens, vocab] fp32 logits are
never held whole (they are the largest activation of a small-d_model, large-vocab model).

Shape legend: N tokens, D model dim, V vocab, C tokens per chunk.

Forward walks the tokens chunk by chunk: logits_CV = h_CD @ W^T in fp32, the chunk's summed loss
(logsumexp - logit of the label), and, when gradients are wanted, the chunk's gradients right
away (softmax - onehot is d loss / d logits), so backward only scales the stored dh and dW. Peak
extra memory is one [C, V] fp32 block instead of [N, V] logits plus their gradient. Matches
F.cross_entropy(h @ W^T, labels) (mean over labels != ignore_index) to fp32 rounding.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over kept tokens of CE(h_ND @ w_VD^T, labels_N), computed `chunk` tokens at a time."""

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        h, w = h_ND.to(compute_dtype), w_VD.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        dh_ND = torch.empty_like(h_ND) if needs_grad else None
        dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if needs_grad else None
        count = (labels_N != IGNORE_INDEX).sum()
        for start in range(0, h.shape[0], chunk):
            h_CD, labels_C = h[start:start + chunk], labels_N[start:start + chunk]
            logits_CV = (h_CD @ w.t()).float()
            keep_C = labels_C != IGNORE_INDEX
            safe_C = labels_C.clamp_min(0)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            target_C = logits_CV.gather(1, safe_C.unsqueeze(1)).squeeze(1)
            total = total + ((lse_C - target_C) * keep_C).sum()
            if needs_grad:  # d(sum of losses)/d logits = softmax - onehot, on kept tokens
                grad_CV = (logits_CV - lse_C.unsqueeze(1)).exp_()
                grad_CV.scatter_add_(1, safe_C.unsqueeze(1), -torch.ones_like(target_C).unsqueeze(1))
                grad_CV.mul_(keep_C.unsqueeze(1))
                grad_CV = grad_CV.to(compute_dtype)
                dh_ND[start:start + chunk] = (grad_CV @ w).to(h_ND.dtype)
                dw_VD.add_((grad_CV.t() @ h_CD).float())
        denom = count.clamp_min(1).to(torch.float32)
        if needs_grad:
            ctx.save_for_backward(dh_ND, dw_VD, denom)
            ctx.w_dtype = w_VD.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dh_ND, dw_VD, denom = ctx.saved_tensors
        scale = grad_loss / denom
        return (dh_ND * scale.to(dh_ND.dtype), (dw_VD * scale).to(ctx.w_dtype), None, None, None)


def chunked_linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor,
                                 chunk: int = 4096) -> torch.Tensor:
    """Mean CE of the logits h_ND @ w_VD^T against labels_N without materialising all logits.
    The projection runs in the autocast dtype when autocast is on (as nn.Linear would)."""
    device_type = h_ND.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h_ND.dtype
    with torch.autocast(device_type, enabled=False):
        return ChunkedLinearCrossEntropy.apply(h_ND, w_VD, labels_N, chunk, dtype)
