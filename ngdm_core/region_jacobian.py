"""Region-based editing (RBE): h-space directions whose effect on the model output stays inside a mask.

``f(h) -> eps`` is the model as a function of its bottleneck activation ``h``. The top right
singular vectors of ``J = d(mask * f)/dh`` change the masked region most; removing from them
their component along the top right singular vectors of ``J_out = d((1 - mask) * f)/dh``
confines the change to the region. Both operators share one linearisation of ``f`` at ``h``,
so every product is one JVP or VJP of ``f`` and no Jacobian is ever materialised.
"""

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps

import torch
from torch.func import jvp, vjp, vmap

from .validation import (require_at_least, require_finite_tensor, require_map_matches, require_positive,
                         require_unit_interval)


def _with_autograd(fn):
    """Run ``fn`` with autograd available even when the caller (a ComfyUI node) is in inference mode."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)
    return wrapper


class Linearisation:
    """``f``'s JVP and VJP at a fixed ``h``, each built once and reused for every vector.

    Tensors that ``f`` closes over must not be inference tensors: autograd cannot save them.
    """

    @_with_autograd
    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor):
        self.h = h.detach().clone()  # a clone made outside inference mode is a normal tensor
        self.work_dtype = torch.promote_types(h.dtype, torch.float32)  # QR and SVD in at least float32
        # Forward mode runs f again for every batch of tangents. torch.func.linearize would reuse a
        # trace, but tracing ComfyUI's U-Net with it crashed the process (CPU, torch 2.13).
        self._jvp = lambda tangent: jvp(f, (self.h,), (tangent,))[1]
        eps, self._vjp = vjp(f, self.h)
        self.eps = eps.detach()

    def jvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """``F v`` for h-space ``vectors`` (k, ...) as (k, *eps.shape)."""
        # No graph: products only feed the iteration, and a graph would also reach f's parameters.
        with torch.inference_mode(False), torch.no_grad():
            tangents = vectors.reshape(-1, *self.h.shape).to(self.h.dtype)
            return vmap(self._jvp)(tangents).to(self.work_dtype)

    def vjp(self, covectors: torch.Tensor) -> torch.Tensor:
        """``F^T u`` for eps-space ``covectors`` (k, *eps.shape) as (k, *h.shape[1:])."""
        with torch.inference_mode(False), torch.no_grad():
            pulled = vmap(self._vjp)(covectors.to(self.eps.dtype))[0]
            return pulled.reshape(len(covectors), *self.h.shape[1:]).to(self.work_dtype)


class MaskedJacobian:
    """``J = d(mask * f(h))/dh`` as batched products; ``counts`` tallies calls and vectors."""

    def __init__(self, linearisation: Linearisation, mask: torch.Tensor):
        self.linearisation = linearisation
        self.mask = mask.to(linearisation.eps.device, linearisation.work_dtype)
        self.counts = Counter()

    def jvp(self, vectors: torch.Tensor) -> torch.Tensor:
        self.counts.update(jvp_calls=1, jvp_vectors=len(vectors))
        return self.mask * self.linearisation.jvp(vectors)

    def vjp(self, covectors: torch.Tensor) -> torch.Tensor:
        self.counts.update(vjp_calls=1, vjp_vectors=len(covectors))
        return self.linearisation.vjp(self.mask * covectors)

    def complement(self) -> "MaskedJacobian":
        """``J_out``: the same linearisation seen through ``1 - mask``."""
        return MaskedJacobian(self.linearisation, 1 - self.mask)

    def leakage(self, vectors: torch.Tensor) -> torch.Tensor:
        """Per direction, ``|(1 - mask) * F v| / |mask * F v|``: its response outside the mask relative to inside."""
        response = self.linearisation.jvp(vectors)
        return ((1 - self.mask) * response).flatten(1).norm(dim=1) / (self.mask * response).flatten(1).norm(dim=1)


def masked_jacobian(f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, mask: torch.Tensor) -> MaskedJacobian:
    """``J = d(mask * f(h))/dh`` at ``h`` (batch 1) for a mask broadcastable to ``f(h)`` with values in [0, 1]."""
    require_finite_tensor("h", h)
    if h.ndim < 1 or h.shape[0] != 1:
        raise ValueError(f"h must hold one image (batch 1), got shape {tuple(h.shape)}")
    require_unit_interval("mask", mask)
    if not (mask > 0).any():
        raise ValueError("mask is empty: it selects no pixel to edit")
    linearisation = Linearisation(f, h)
    require_map_matches("mask", mask, linearisation.eps)
    return MaskedJacobian(linearisation, mask.detach().clone())


@dataclass
class Directions:
    """Top right singular vectors of a masked Jacobian and what finding them cost.

    ``residual`` is the largest ``tan`` of the angle between a direction ``v`` and ``J^T J v``:
    how far a direction would still turn in one more iteration. A product over a batch of
    vectors counts as one call; ``*_vectors`` count the vectors, one forward-pass-sized
    JVP or VJP each.
    """
    vectors: torch.Tensor  # (k, *h.shape[1:]), unit length, by singular value descending
    singular_values: torch.Tensor  # (k,)
    iterations: int
    converged: bool
    residual: float
    jvp_calls: int
    jvp_vectors: int
    vjp_calls: int
    vjp_vectors: int


def _orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(rows.T).Q.T


def _iterate(jacobian: MaskedJacobian, start: torch.Tensor, found: torch.Tensor, max_iter: int, tol: float,
             progress) -> tuple:
    """Subspace iteration on ``J^T J`` from the rows of ``start``, kept orthogonal to the rows of ``found``.

    Each iteration is one JVP and one VJP of the whole block. The SVD of ``J V`` (Rayleigh-Ritz)
    rotates the block onto the current singular-vector estimates, sorted by singular value.
    """
    def deflate(rows):
        return rows - (rows @ found.T) @ found

    basis = _orthonormal_rows(deflate(start))
    for iteration in range(1, max_iter + 1):
        images = jacobian.jvp(basis).flatten(1)
        left, values, rotation = torch.linalg.svd(images.T, full_matrices=False)
        ritz = rotation @ basis
        covectors = (values[:, None] * left.T).reshape(-1, *jacobian.linearisation.eps.shape)
        pulled = deflate(jacobian.vjp(covectors).flatten(1))
        squared = values.square()[:, None]
        turn = (pulled - squared * ritz).norm(dim=1) / squared[:, 0].clamp_min(torch.finfo(squared.dtype).tiny)
        residual = turn.max().item()
        if progress is not None:
            progress(iteration)
        if residual <= tol:
            break
        basis = _orthonormal_rows(pulled)
    return ritz, values, iteration, residual <= tol, residual


def _check_iteration(k: int, max_iter: int, tol: float, most: int) -> None:
    require_at_least("k", k, 1)
    if k > most:
        raise ValueError(f"k must be at most {most}, the number of directions the Jacobian has, got {k}")
    require_at_least("max_iter", max_iter, 1)
    require_positive("tol", tol)


def _most_directions(jacobian: MaskedJacobian) -> int:
    return min(jacobian.linearisation.h.numel(), jacobian.linearisation.eps.numel())


def _start(jacobian: MaskedJacobian, k: int, seed: int) -> torch.Tensor:
    """``k`` random h-space rows, drawn on the CPU so a seed gives the same start on every device."""
    h = jacobian.linearisation.h
    rows = torch.randn(k, h.numel(), generator=torch.Generator().manual_seed(seed), dtype=jacobian.mask.dtype)
    return rows.to(h.device)


def _directions(jacobian: MaskedJacobian, before: Counter, vectors, values, iterations, converged, residual):
    # A singular vector's sign is arbitrary: fix it so its largest entry is positive, whatever the seed.
    signs = torch.sign(vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True)))
    counts = jacobian.counts - before
    return Directions(
        (signs * vectors).reshape(len(vectors), *jacobian.linearisation.h.shape[1:]), values, iterations, converged,
        residual, counts["jvp_calls"], counts["jvp_vectors"], counts["vjp_calls"], counts["vjp_vectors"])


@_with_autograd
def top_directions(jacobian: MaskedJacobian, k: int = 3, max_iter: int = 50, tol: float = 1e-5, seed: int = 0,
                   progress=None) -> Directions:
    """The top-``k`` right singular directions of ``jacobian`` by block (subspace) power iteration.

    Stops once every direction's residual is at most ``tol`` or after ``max_iter`` iterations;
    ``progress(done, max_iter)`` is called after each iteration and may raise to abort.
    """
    _check_iteration(k, max_iter, tol, _most_directions(jacobian))
    before = Counter(jacobian.counts)
    start = _start(jacobian, k, seed)
    found = _iterate(jacobian, start, start[:0], max_iter, tol, progress and (lambda done: progress(done, max_iter)))
    return _directions(jacobian, before, *found)


@_with_autograd
def top_directions_sequential(jacobian: MaskedJacobian, k: int = 3, max_iter: int = 50, tol: float = 1e-5,
                              seed: int = 0, progress=None) -> Directions:
    """The baseline for :func:`top_directions`: power iteration for one direction at a time, deflating earlier ones.

    Same start, residual and ``tol`` per direction; ``max_iter`` applies to each direction and
    ``iterations`` is their total.
    """
    _check_iteration(k, max_iter, tol, _most_directions(jacobian))
    before = Counter(jacobian.counts)
    start = _start(jacobian, k, seed)
    vectors, values, iterations, residuals = start[:0], start.new_empty(0), 0, []
    for index in range(k):
        vector, value, spent, _, residual = _iterate(
            jacobian, start[index:index + 1], vectors, max_iter, tol,
            progress and (lambda done: progress(index * max_iter + done, k * max_iter)))
        vectors, values = torch.cat([vectors, vector]), torch.cat([values, value])
        iterations += spent
        residuals.append(residual)
    residual = max(residuals)
    return _directions(jacobian, before, vectors, values, iterations, residual <= tol, residual)


def confine(inside, outside_basis) -> torch.Tensor:
    """``inside`` directions (k, ...) less their component in the span of ``outside_basis`` (r, ...), at unit length.

    With one outside direction this is the authors' ``u - <u, u_out>/<u_out, u_out> * u_out``.
    Either argument may be a :class:`Directions`; the outside rows must be linearly independent.
    """
    inside, outside = getattr(inside, "vectors", inside), getattr(outside_basis, "vectors", outside_basis)
    if outside.shape[1:] != inside.shape[1:]:
        raise ValueError(f"outside_basis has directions of shape {tuple(outside.shape[1:])} but the inside ones "
                         f"have {tuple(inside.shape[1:])}")
    flat = inside.flatten(1)
    span = _orthonormal_rows(outside.flatten(1).to(flat.dtype))
    kept = flat - (flat @ span.T) @ span
    # What survives a projection of a direction lying in the span is rounding noise.
    vanished = kept.norm(dim=1) <= math.sqrt(torch.finfo(flat.dtype).eps) * flat.norm(dim=1)
    if vanished.any():
        raise ValueError(f"inside direction {int(vanished.nonzero()[0])} lies in the outside subspace: "
                         "nothing is left of it after confinement")
    return (kept / kept.norm(dim=1, keepdim=True)).reshape(inside.shape)


@dataclass
class RegionDirections:
    """Confined directions and how they were found.

    ``vectors`` (k, *h.shape[1:]) are the inside directions confined against the outside ones;
    ``singular_values`` are those of the inside directions before confinement. ``leakage`` is
    each direction's response outside the mask relative to inside, ``unconfined_leakage`` the
    same for ``inside.vectors``.
    """
    vectors: torch.Tensor
    singular_values: torch.Tensor
    inside: Directions
    outside: Directions | None
    leakage: torch.Tensor
    unconfined_leakage: torch.Tensor

    @property
    def converged(self) -> bool:
        return self.inside.converged and (self.outside is None or self.outside.converged)


@_with_autograd
def region_directions(f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, mask: torch.Tensor, k: int = 3,
                      r: int = 1, max_iter: int = 50, tol: float = 1e-5, seed: int = 0,
                      progress=None) -> RegionDirections:
    """The top-``k`` directions of ``h`` that change the masked region, confined against the top-``r`` outside ones.

    ``progress(done, total)`` is called once per iteration, over both searches, and may raise to abort.
    """
    _check_iteration(k, max_iter, tol, h.numel())
    require_at_least("r", r, 0)
    if (mask >= 1).all():
        raise ValueError("mask covers the whole image: nothing is left outside it to keep")
    inside = masked_jacobian(f, h, mask)
    total = max_iter * (2 if r else 1)
    found = top_directions(inside, k, max_iter, tol, seed, progress and (lambda done, _: progress(done, total)))
    outside = None
    if r:
        outside = top_directions(inside.complement(), r, max_iter, tol, seed,
                                 progress and (lambda done, _: progress(max_iter + done, total)))
    vectors = found.vectors if outside is None else confine(found, outside)
    return RegionDirections(vectors, found.singular_values, found, outside, inside.leakage(vectors),
                            inside.leakage(found.vectors))
