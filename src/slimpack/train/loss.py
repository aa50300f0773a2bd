"""Chunked linear + cross-entropy: the loss without (T, V) fp32 logits for the 128K vocabulary.

    cross_entropy_sum(hidden, weight, labels) = sum over labels != -100 of
        logsumexp(hidden @ weight.T) - (hidden @ weight.T)[label]              (fp32 scalar)

Full fp32 logits for a 4 x 2048-token micro-batch would be 8192 x 128256 x 4 B = 4.2 GB (plus as
much again for their gradient). Here tokens go through in chunks of `chunk_tokens`: each chunk's
logits are made in the matmul dtype (bf16 under FSDP mixed precision), upcast to fp32 for the
logsumexp, reduced and dropped. Forward keeps only the per-token logsumexp (T fp32 values); backward
recomputes each chunk's logits and forms  dlogits = (softmax - onehot) * grad  to accumulate
dhidden = dlogits @ W and dW = dlogits^T @ hidden (dW in fp32 across chunks, cast once at the end).
Cost: one extra (T x D x V) matmul over a plain linear + cross-entropy; peak extra memory about
chunk_tokens x V x 6 B (fp32 logits + bf16 dlogits: 0.8 GB at 1024 tokens) plus a fp32 dW (V x D x 4 B).

The function returns a SUM, never a mean: the trainer divides by the global count of valid labels
(all micro-batches of the step, all ranks; `count_valid` summed and all-reduced), so every token
weighs the same however documents and -100 labels fall across micro-batches and ranks.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def count_valid(labels: torch.Tensor) -> int:
    """Number of labels that count toward the loss (!= -100). Syncs with the device."""
    return int((labels != IGNORE_INDEX).sum().item())


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      chunk_tokens: int = 1024) -> torch.Tensor:
    """fp32 sum of token cross-entropies of `hidden @ weight.T` against `labels`, chunked over tokens.

    hidden (T, D) and weight (V, D) in the same dtype (the matmul dtype), labels (T,) int64 with
    IGNORE_INDEX (-100) for tokens without a target. Differentiable in hidden and weight.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"cross_entropy_sum wants hidden (T, D) and weight (V, D); got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (T,) = ({hidden.shape[0]},), "
                         "one per hidden row")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden {hidden.dtype} and weight {weight.dtype} must share the matmul dtype; "
                         "cast one (under FSDP mixed precision both are bf16)")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens)


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, total)) for s in range(0, total, size)]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        T = hidden.shape[0]
        lse = torch.empty(T, dtype=torch.float32, device=hidden.device)  # (T,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in _chunks(T, chunk_tokens):
            logits = (hidden[start:end] @ weight.T).float()  # (C, V) fp32, one chunk only
            lab = labels[start:end]
            lse_c = torch.logsumexp(logits, dim=-1)  # (C,)
            target = logits.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)  # (C,)
            total += torch.where(lab != IGNORE_INDEX, lse_c - target, 0.0).sum()
            lse[start:end] = lse_c
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_tokens = chunk_tokens
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        chunks = _chunks(hidden.shape[0], ctx.chunk_tokens)
        # dW sums over chunks: accumulate in fp32 so bf16 rounding happens once, not per chunk.
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start, end in chunks:
            h = hidden[start:end]  # (C, D)
            lab = labels[start:end]
            valid = lab != IGNORE_INDEX
            probs = (h @ weight.T).float()  # (C, V)
            probs.sub_(lse[start:end, None]).exp_()  # softmax
            probs.scatter_add_(1, lab.clamp(min=0)[:, None], probs.new_full((end - start, 1), -1.0))
            probs.mul_((valid * grad_total.float())[:, None])  # ignored rows -> 0
            dlogits = probs.to(hidden.dtype)  # (C, V) matmul dtype
            del probs
            if need_hidden:
                grad_hidden[start:end] = dlogits @ weight
            if need_weight:
                grad_weight += (dlogits.T @ h).float()
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None
