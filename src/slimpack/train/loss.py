"""Chunked linear + cross-entropy: the loss without (T, V) fp32 logits for the 128K vocabulary.

    cross_entropy_sum(hidden, weight, labels) = sum over labels != -100 of
        logsumexp(hidden @ weight.T) - (hidden @ weight.T)[label]              (fp32 scalar)

Full fp32 logits for a 4 x 2048-token micro-batch would be 8192 x 128256 x 4 B = 4.2 GB (plain
`F.cross_entropy` on them peaks at 12.6 GB with its gradient, BENCHMARKS.md). Here tokens go
through in chunks of `chunk_tokens`: a chunk's logits are made in the matmul dtype (bf16 under FSDP
mixed precision), upcast to fp32 for the logsumexp, and the chunk's loss and, when a gradient is
wanted, its gradient are formed right away (one compiled kernel pair on CUDA):

    dlogits = softmax - onehot(label)  (rows of ignored labels zeroed)
    dhidden[chunk] = dlogits @ W          dW += dlogits^T @ hidden[chunk]   (dW summed in fp32)

Then the chunk's logits are dropped. Backward only scales the stored dhidden (T x D) and dW (V x D,
cast once to the weight dtype) by the incoming gradient. So the cost is the plain path's three
(T x D x V) matmuls, not four as when backward recomputes the logits, plus elementwise work over
one chunk at a time; the price is holding dW (one weight's size) from forward to backward. Peak extra
memory: a few chunk_tokens x V buffers (bf16 logits and dlogits; fp32 temporaries on the eager
CPU path) plus the fp32 dW accumulator (V x D x 4 B = 1.05 GB for the 1.3B model).

The function returns a SUM, never a mean: the trainer divides by the global count of valid labels
(all micro-batches of the step, all ranks; `count_valid` summed and all-reduced), so every token
weighs the same however documents and -100 labels fall across micro-batches and ranks.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100
CHUNK_TOKENS = 2048  # tokens per chunk (`slimpack bench train` measures others beside it)


def count_valid(labels: torch.Tensor) -> int:
    """Number of labels that count toward the loss (!= -100). Syncs with the device."""
    return int((labels != IGNORE_INDEX).sum().item())


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """fp32 sum of token cross-entropies of `hidden @ weight.T` against `labels`, chunked over tokens.

    hidden (T, D) and weight (V, D) in the same dtype (the matmul dtype), labels (T,) int64 with
    IGNORE_INDEX (-100) for tokens without a target. Differentiable in hidden and weight; under
    no_grad (evaluation) no gradient is formed.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"cross_entropy_sum wants hidden (T, D) and weight (V, D); got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 token ids (-100 for none); got {labels.dtype}")
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


def _chunk_loss_and_dlogits(logits: torch.Tensor, target: torch.Tensor,
                            valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: loss sum over valid rows, and dloss/dlogits = softmax - onehot in the logits dtype.

    logits (C, V) in the matmul dtype, target (C, 1) int64 (ignored rows point anywhere), valid (C,).
    Rows of ignored labels are NOT zeroed here (the caller masks them on the cheap (C, D) side).
    """
    lf = logits.float()  # (C, V) fp32
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)  # (C, 1)
    loss = torch.where(valid, (lse - lf.gather(1, target)).squeeze(1), 0.0).sum()
    onehot = torch.arange(lf.shape[1], device=lf.device) == target  # (C, V) from an iota, no scatter
    return loss, (torch.exp(lf - lse) - onehot.float()).to(logits.dtype)


@functools.cache
def _chunk_fn(on_cuda: bool):
    """On CUDA the chunk's elementwise work as one compiled kernel pair (a row reduction, then one
    pointwise pass writing bf16 dlogits) instead of ~5 fp32 passes over (C, V): 15 -> a few ms per
    8192-token step (BENCHMARKS.md). CPU keeps the eager function (tests, no compile cost); compiled
    lazily so importing this module does not import dynamo."""
    return torch.compile(_chunk_loss_and_dlogits) if on_cuda else _chunk_loss_and_dlogits


@functools.cache
def _has_fp32_out_addmm(device: torch.device) -> bool:
    """Whether addmm can take bf16/fp16 operands into an fp32 output (CUDA, recent torch)."""
    try:
        acc = torch.zeros(2, 2, device=device)
        a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool(acc[0, 0].item() == 2.0)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, with a, b in the matmul dtype: in the GEMM epilogue where supported."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _has_fp32_out_addmm(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


def _loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int, *,
                    need_hidden: bool, need_weight: bool):
    """(loss sum, dloss/dhidden or None, dloss/dweight or None), one chunk of logits at a time."""
    T = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None
    if need_weight:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    chunk_fn = _chunk_fn(hidden.is_cuda)
    for start in range(0, T, chunk_tokens):
        end = min(start + chunk_tokens, T)
        h = hidden[start:end]  # (C, D)
        lab = labels[start:end]
        valid = lab != IGNORE_INDEX  # (C,)
        target = lab.clamp(min=0)[:, None]  # (C, 1); ignored rows point at 0 and are masked below
        logits = h @ weight.T  # (C, V) matmul dtype
        if not (need_hidden or need_weight):
            lf = logits.float()
            total += torch.where(valid, torch.logsumexp(lf, -1) - lf.gather(1, target).squeeze(1), 0.0).sum()
            continue
        loss, dlogits = chunk_fn(logits, target, valid)  # dlogits (C, V) matmul dtype
        del logits
        total += loss
        # Zero the ignored rows on the (C, D) side, not the (C, V) side: same result, 60x less work.
        mask = valid[:, None].to(hidden.dtype)  # (C, 1)
        if need_hidden:
            grad_hidden[start:end] = (dlogits @ weight) * mask
        if need_weight:
            _accumulate(grad_weight, dlogits.T, h * mask)  # fp32 sum over chunks: one rounding at the end
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
