"""The chunked cross-entropy equals a plain fp32 `F.cross_entropy` over full logits (value and
gradients, ignored labels and all-ignored chunks included), and summing per micro-batch then dividing
by the global valid-label count is the token mean over the whole step (not a mean of means)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimpack.train.loss import IGNORE_INDEX, count_valid, cross_entropy_sum

T, D, V = 70, 32, 1000


def _data(seed: int, dtype=torch.float32, ignore_rows=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.2] = IGNORE_INDEX
    for rows in ignore_rows:
        labels[rows] = IGNORE_INDEX
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    return F.cross_entropy(hidden.float() @ weight.float().T, labels, ignore_index=IGNORE_INDEX,
                           reduction="sum")


@pytest.mark.parametrize("chunk_tokens", [1, 16, 64, 70, 1024])
def test_fp32_value_and_gradients_equal_plain_cross_entropy(chunk_tokens):
    # Rows 16..31 all ignored: with chunk_tokens=16 a whole chunk has nothing to learn from.
    hidden, weight, labels = _data(0, ignore_rows=[slice(16, 32)])
    loss = cross_entropy_sum(hidden, weight, labels, chunk_tokens=chunk_tokens)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    gh, gw = torch.autograd.grad(loss * 0.37, (hidden, weight))  # a non-unit upstream gradient
    ref = _reference(hidden, weight, labels)
    rh, rw = torch.autograd.grad(ref * 0.37, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    assert torch.all(gh[16:32] == 0)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_bf16_matches_the_unchunked_bf16_path_and_the_fp32_reference():
    hidden, weight, labels = _data(1, dtype=torch.bfloat16)
    loss = cross_entropy_sum(hidden, weight, labels, chunk_tokens=16)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert gh.dtype == gw.dtype == torch.bfloat16
    # What an unchunked bf16 model would do: bf16 logits, upcast, cross-entropy.
    plain = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ph, pw = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-4)
    assert _rel_err(gh, ph) < 5e-3 and _rel_err(gw, pw) < 5e-3
    # fp32 reference on the same bf16-rounded inputs: only bf16 rounding of logits and grads differs.
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = _reference(h32, w32, labels)
    rh, rw = torch.autograd.grad(ref, (h32, w32))
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=0)
    assert _rel_err(gh, rh) < 1e-2 and _rel_err(gw, rw) < 1e-2


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, labels = _data(2)
    labels[:] = IGNORE_INDEX
    loss = cross_entropy_sum(hidden, weight, labels, chunk_tokens=8)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0)
    assert count_valid(labels) == 0


def test_global_normalisation_over_micro_batches_is_the_token_mean():
    """Two micro-batches (or ranks) with different numbers of valid labels: sum / global count equals
    the mean over all tokens of the step, which a mean of per-micro-batch means does not."""
    hidden, weight, labels = _data(3)
    labels[:30][torch.arange(30) % 3 != 0] = IGNORE_INDEX  # micro-batch 1 is mostly ignored
    parts = [(hidden[:35], labels[:35]), (hidden[35:], labels[35:])]
    global_count = sum(count_valid(lab) for _, lab in parts)
    assert global_count == count_valid(labels)
    total = sum(cross_entropy_sum(h, weight, lab, chunk_tokens=16) for h, lab in parts) / global_count
    gh, gw = torch.autograd.grad(total, (hidden, weight))
    logits = hidden.float() @ weight.float().T
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)  # mean over valid tokens
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-7)
    mean_of_means = sum(F.cross_entropy(logits[s], labels[s]) for s in (slice(0, 35), slice(35, T))) / 2
    assert abs(mean_of_means.item() - ref.item()) > 1e-3


def test_no_gradient_for_frozen_weight():
    hidden, weight, labels = _data(4)
    weight.requires_grad_(False)
    (gh,) = torch.autograd.grad(cross_entropy_sum(hidden, weight, labels, chunk_tokens=32), (hidden,))
    (rh,) = torch.autograd.grad(_reference(hidden, weight, labels), (hidden,))
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)


def test_no_grad_gives_the_same_value_and_no_graph():
    hidden, weight, labels = _data(6)
    with torch.no_grad():
        loss = cross_entropy_sum(hidden, weight, labels, chunk_tokens=16)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _reference(hidden, weight, labels), rtol=1e-6, atol=1e-4)


def test_bad_inputs_are_refused():
    hidden, weight, labels = _data(5)
    with pytest.raises(ValueError, match="one per hidden row"):
        cross_entropy_sum(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="weight \\(V, D\\)"):
        cross_entropy_sum(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="share the matmul dtype"):
        cross_entropy_sum(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="int64"):
        cross_entropy_sum(hidden, weight, labels.int())
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        cross_entropy_sum(hidden, weight, labels, chunk_tokens=0)


def test_the_trainers_chunk_size_reaches_the_loss_kernel():
    """`micro_step_loss(..., loss_chunk_tokens=N)` (what bench train's candidates set) chunks by N: the
    value is the same for any N, and a bad N is refused by the kernel itself."""
    from slimpack.model.transformer import Transformer, model_config
    from slimpack.train.loop import micro_step_loss

    torch.manual_seed(0)
    model = Transformer(model_config("tiny"))
    T = 96
    ids = torch.randint(0, 1000, (T,))
    mb = {"input_ids": ids, "labels": torch.roll(ids, -1), "position_ids": torch.arange(T),
          "cu_seqlens": torch.tensor([0, T], dtype=torch.int32), "max_seqlen": T}
    with torch.no_grad():
        default = micro_step_loss(model, mb)
        torch.testing.assert_close(micro_step_loss(model, mb, loss_chunk_tokens=7), default)
        with pytest.raises(ValueError, match="chunk_tokens=0"):
            micro_step_loss(model, mb, loss_chunk_tokens=0)
