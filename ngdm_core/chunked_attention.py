"""Softmax attention in blocks of query rows, with exact forward-mode (JVP) and reverse-mode (VJP) derivatives.

Autograd through a plain attention keeps its whole score matrix (heads x queries x keys) for the
backward pass, and forward mode carries it with its tangent and the softmax derivative's
temporaries. At a 64x64 latent that is 8 x 4096 x 4096 floats, 0.5 GiB per copy, which is what made
the region Jacobian's products several times a sampling step's memory. Here no score matrix is ever
whole: the forward pass keeps only each row's log-sum-exp, and both derivatives recompute one block
of rows of the probabilities at a time (FlashAttention's scheme). The block holds ``rows`` query
rows, so the largest temporaries are ``rows x keys`` per head, whatever the number of tokens.

It is a ``torch.autograd.Function`` with a generated vmap rule, so ``torch.func.jvp``, ``vjp`` and
``vmap`` over a block of tangents or covectors all go through it.
"""

import torch


def _scores(q: torch.Tensor, k: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    return q[..., start:start + rows, :] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5


class _BlockedAttention(torch.autograd.Function):
    """``(softmax(q k^T / sqrt(d)) v, logsumexp of each score row)`` for q (..., Tq, d), k and v (..., Tk, d)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, rows):
        outputs, row_lse = [], []
        for start in range(0, q.shape[-2], rows):
            scores = _scores(q, k, start, rows)
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            outputs.append(torch.exp(scores - lse) @ v)
            row_lse.append(lse)
        return torch.cat(outputs, dim=-2), torch.cat(row_lse, dim=-2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, ctx.rows = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        grad_q, grad_k, grad_v = [], torch.zeros_like(k), torch.zeros_like(v)
        for start in range(0, q.shape[-2], ctx.rows):
            block = slice(start, start + ctx.rows)
            probabilities = torch.exp(_scores(q, k, start, ctx.rows) - lse[..., block, :])
            g = grad_out[..., block, :]
            # d(out)/d(scores) through the softmax, plus the log-sum-exp's own d(lse)/d(scores) = probabilities.
            row_term = (g * out[..., block, :]).sum(dim=-1, keepdim=True) - grad_lse[..., block, :]
            grad_scores = probabilities * (g @ v.transpose(-1, -2) - row_term) * scale
            grad_q.append(grad_scores @ k)
            # Out of place: under vmap the sums become batched while their start is not.
            grad_k = grad_k + grad_scores.transpose(-1, -2) @ q[..., block, :]
            grad_v = grad_v + probabilities.transpose(-1, -2) @ g
        return torch.cat(grad_q, dim=-2), grad_k, grad_v, None

    @staticmethod
    def jvp(ctx, tangent_q, tangent_k, tangent_v, _):
        q, k, v = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        tangent_out, tangent_lse = [], []
        for start in range(0, q.shape[-2], ctx.rows):
            block = slice(start, start + ctx.rows)
            scores = _scores(q, k, start, ctx.rows)
            probabilities = torch.softmax(scores, dim=-1)
            tangent_scores = 0
            if tangent_q is not None:
                tangent_scores = tangent_q[..., block, :] @ k.transpose(-1, -2) * scale
            if tangent_k is not None:
                tangent_scores = tangent_scores + q[..., block, :] @ tangent_k.transpose(-1, -2) * scale
            d_lse = (probabilities * tangent_scores).sum(dim=-1, keepdim=True)
            block_out = (probabilities * (tangent_scores - d_lse)) @ v
            if tangent_v is not None:
                block_out = block_out + probabilities @ tangent_v
            tangent_out.append(block_out)
            tangent_lse.append(d_lse)
        return torch.cat(tangent_out, dim=-2), torch.cat(tangent_lse, dim=-2)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for q (..., Tq, d), k and v (..., Tk, d), ``rows`` query rows at a time.

    Computed in float32 (the scores of half-precision inputs would lose the softmax's range) and
    returned in ``q``'s dtype. Its JVP and VJP are exact and hold one block of scores at a time.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    work = torch.promote_types(q.dtype, torch.float32)
    out, _ = _BlockedAttention.apply(q.to(work), k.to(work), v.to(work), rows)
    return out.to(q.dtype)


def rows_per_block(heads: int, keys: int, block_bytes: float) -> int:
    """How many query rows keep one float32 block of scores (``heads`` x rows x ``keys``) within ``block_bytes``."""
    return max(1, int(block_bytes // (heads * keys * 4)))

