"""Chunked linear + cross-entropy: the loss without (T, V) fp32 logits for the 128K vocabulary.

    cross_entropy_sum(hidden, weight, labels) = sum over labels != -100 of
        logsumexp(hidden @ weight.T) - (hidden @ weight.T)[label]              (fp32 scalar)

Full fp32 logits for a 4 x 2048-token micro-batch would be 8192 x 128256 x 4 B = 4.2 GB (plain
`F.cross_entropy` on them peaks at 12.6 GB with its gradient, BENCHMARKS.md). Here tokens go
through in chunks of `chunk_tokens`: a chunk's logits are made in the matmul dtype (bf16 under FSDP
mixed precision) and turned into fp32 log-probabilities by one fused log_softmax; the chunk's loss
is gathered from them and, when a gradient is wanted, so is its gradient right away:

    dlogits = softmax - onehot(label)  (rows of ignored labels zeroed)
    dhidden[chunk] = dlogits @ W          dW += dlogits^T @ hidden[chunk]   (dW summed in fp32)

Then the chunk's logits are dropped. Backward only scales the stored dhidden (T x D) and dW (V x D,
cast once to the weight dtype) by the incoming gradient. So the cost is the plain path's three
(T x D x V) matmuls, not four as when backward recomputes the logits, and a few fp32 passes over one
chunk at a time; the price is holding dW (one weight's size) from forward to backward. Peak extra
memory: about chunk_tokens x V x 8 B (bf16 logits, fp32 log-probs, bf16 dlogits: 2.1 GB at 2048
tokens) plus the fp32 dW accumulator (V x D x 4 B = 1.05 GB for the 1.3B model).

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
                      chunk_tokens: int = 2048) -> torch.Tensor:
    """fp32 sum of token cross-entropies of `hidden @ weight.T` against `labels`, chunked over tokens.

    hidden (T, D) and weight (V, D) in the same dtype (the matmul dtype), labels (T,) int64 with
    IGNORE_INDEX (-100) for tokens without a target. Differentiable in hidden and weight; under
    no_grad (evaluation) no gradient is formed.
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
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens)
    return _loss_and_grads(hidden, weight, labels, chunk_tokens, need_hidden=False, need_weight=False)[0]


def _loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int, *,
                    need_hidden: bool, need_weight: bool):
    """(loss sum, dloss/dhidden or None, dloss/dweight or None), one chunk of logits at a time."""
    T = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None
    if need_weight:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, T, chunk_tokens):
        end = min(start + chunk_tokens, T)
        h = hidden[start:end]  # (C, D)
        lab = labels[start:end]
        valid = lab != IGNORE_INDEX  # (C,)
        target = lab.clamp(min=0)[:, None]  # (C, 1); ignored rows point at 0 and are masked below
        logp = torch.log_softmax(h @ weight.T, dim=-1, dtype=torch.float32)  # (C, V) fp32
        total -= torch.where(valid, logp.gather(1, target).squeeze(1), 0.0).sum()
        if not (need_hidden or need_weight):
            continue
        probs = logp.exp_()  # softmax, in place
        del logp
        probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))  # softmax - onehot
        dlogits = probs.to(hidden.dtype)  # (C, V) matmul dtype
        del probs
        # Zero the ignored rows on the (C, D) side, not the (C, V) side: same result, 60x less work.
        mask = valid[:, None].to(hidden.dtype)  # (C, 1)
        if need_hidden:
            grad_hidden[start:end] = (dlogits @ weight) * mask
        if need_weight:
            grad_weight += dlogits.T @ (h * mask)  # fp32 sum over chunks: one bf16 rounding, at the end
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        total, grad_hidden, grad_weight = _loss_and_grads(hidden, weight, labels, chunk_tokens,
                                                          need_hidden=need_hidden, need_weight=need_weight)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # A 0-dim fp32 factor keeps the bf16 result dtype and is applied in fp32 before one rounding.
        return (None if grad_hidden is None else grad_hidden * grad_total,
                None if grad_weight is None else grad_weight * grad_total, None, None)
