"""Region-based editing (RBE): h-space directions whose effect on the model output stays inside a mask.

``f(h) -> eps`` is the model as a function of its bottleneck activation ``h``, ``F`` its Jacobian
at ``h``, ``J_in = mask * F`` and ``J_out = (1 - mask) * F``. Three confinements:

- ``"ratio"`` (the pack's): the directions maximising ``|J_in v|^2 / (|J_out v|^2 + ridge' |v|^2)``,
  the top eigenvectors of the pencil ``(J_in^T J_in, J_out^T J_out + ridge' I)``, found by
  LOBPCG. They are confined by construction: a direction is ranked by how little it leaks.
  The ridge keeps the ratio finite on ``J_out``'s null space, where it then prefers the
  directions that change the inside most; ``ridge'`` is ``ridge`` times ``J_out``'s mean
  energy per direction, ``|J_out|_F^2 / dim h``.
- ``"rank1"`` (the authors'): the top right singular vectors of ``J_in`` less their component
  along the top-``r`` right singular vectors of ``J_out`` (``r = 1`` in the paper).
- ``"none"``: the top right singular vectors of ``J_in``.

Every operator shares one linearisation of ``f`` at ``h``, so every product is one JVP or VJP
of ``f`` and no Jacobian is ever materialised.
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
    ``max_batch`` caps how many vectors go through ``f`` at once (all of them when None): a
    block of vectors is split into calls of at most that many, which bounds the memory the
    products take at the cost of more passes over ``f``'s weights.
    """

    @_with_autograd
    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, max_batch: int | None = None):
        if max_batch is not None:
            require_at_least("max_batch", max_batch, 1)
        self.max_batch = max_batch
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
            return vmap(self._jvp, chunk_size=self.max_batch)(tangents).to(self.work_dtype)

    def vjp(self, covectors: torch.Tensor) -> torch.Tensor:
        """``F^T u`` for eps-space ``covectors`` (k, *eps.shape) as (k, *h.shape[1:])."""
        with torch.inference_mode(False), torch.no_grad():
            pulled = vmap(self._vjp, chunk_size=self.max_batch)(covectors.to(self.eps.dtype))[0]
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


def masked_jacobian(f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, mask: torch.Tensor,
                    max_batch: int | None = None) -> MaskedJacobian:
    """``J = d(mask * f(h))/dh`` at ``h`` (batch 1) for a mask broadcastable to ``f(h)`` with values in [0, 1].

    ``max_batch`` is :class:`Linearisation`'s.
    """
    require_finite_tensor("h", h)
    if h.ndim < 1 or h.shape[0] != 1:
        raise ValueError(f"h must hold one image (batch 1), got shape {tuple(h.shape)}")
    require_unit_interval("mask", mask)
    if not (mask > 0).any():
        raise ValueError("mask is empty: it selects no pixel to edit")
    linearisation = Linearisation(f, h, max_batch)
    require_map_matches("mask", mask, linearisation.eps)
    return MaskedJacobian(linearisation, mask.detach().clone())


@dataclass(kw_only=True)
class SearchCost:
    """How a search ended and what it cost.

    ``residual`` is the largest relative residual of a direction (for singular directions, the
    ``tan`` of the angle between ``v`` and ``J^T J v``: how far it would still turn in one more
    iteration). A product over a batch of vectors counts as one call; ``*_vectors`` count the
    vectors, one forward-pass-sized JVP or VJP each.
    """
    iterations: int
    converged: bool
    residual: float
    jvp_calls: int
    jvp_vectors: int
    vjp_calls: int
    vjp_vectors: int


@dataclass
class Directions(SearchCost):
    """Top right singular vectors of a masked Jacobian and what finding them cost."""
    vectors: torch.Tensor  # (k, *h.shape[1:]), unit length, by singular value descending
    singular_values: torch.Tensor  # (k,)


def _search_cost(counts: Counter, iterations: int, converged: bool, residual: float) -> dict:
    return dict(iterations=iterations, converged=converged, residual=residual, jvp_calls=counts["jvp_calls"],
                jvp_vectors=counts["jvp_vectors"], vjp_calls=counts["vjp_calls"], vjp_vectors=counts["vjp_vectors"])


def _signed(vectors: torch.Tensor, h_shape) -> torch.Tensor:
    """Unit rows (k, n) as directions (k, *h_shape[1:]), each signed so its largest entry is positive.

    An eigenvector's sign is arbitrary: fixing it makes a direction the same whatever the seed.
    """
    signs = torch.sign(vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True)))
    return (signs * vectors).reshape(len(vectors), *h_shape[1:])


def _orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(rows.T).Q.T


def _iterate(jacobian: MaskedJacobian, start: torch.Tensor, found: torch.Tensor, max_iter: int, tol: float,
             progress) -> tuple:
    """Power (subspace) iteration on ``J^T J`` from the rows of ``start``, kept orthogonal to the rows of ``found``.

    The sequential baseline runs it one row at a time, deflating the directions found before.

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
    return Directions(_signed(vectors, jacobian.linearisation.h.shape), values,
                      **_search_cost(jacobian.counts - before, iterations, converged, residual))


@_with_autograd
def top_directions(jacobian: MaskedJacobian, k: int = 3, max_iter: int = 50, tol: float = 1e-5, seed: int = 0,
                   progress=None) -> Directions:
    """The top-``k`` right singular directions of ``jacobian``, all ``k`` at once by LOBPCG on ``J^T J``.

    Stops once every direction's residual is at most ``tol`` or after ``max_iter`` iterations;
    ``progress(done, max_iter)`` is called after each iteration and may raise to abort.
    """
    _check_iteration(k, max_iter, tol, _most_directions(jacobian))
    before = Counter(jacobian.counts)
    vectors, values, iterations, converged, residual, *_ = _lobpcg(
        jacobian, None, 1.0, k, 0, max_iter, tol, seed, progress and (lambda done: progress(done, max_iter)))
    return _directions(jacobian, before, vectors, values.clamp_min(0).sqrt(), iterations, converged, residual)


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
class RatioDirections(SearchCost):
    """Top generalised eigenvectors of ``(J_in^T J_in, J_out^T J_out + ridge I)`` and what finding them cost.

    ``ratios`` are ``|J_in v|^2 / (|J_out v|^2 + ridge |v|^2)``; ``ridge`` is the absolute one used.
    ``residual`` is the largest ``|A v - ratio B v| / (ratio |B v|)``, zero for an exact eigenvector.
    """
    vectors: torch.Tensor  # (k, *h.shape[1:]), unit length, by ratio descending
    ratios: torch.Tensor  # (k,)
    ridge: float
    block: torch.Tensor  # (k + guard, *h.shape[1:]): every vector iterated, unit length, to warm-start a later search


# Extra vectors searched beside the k wanted: the top ratios of a trained model are close together,
# and a block k wide would converge at the rate of the small gap between its k-th and (k+1)-th.
GUARD_VECTORS = 5


def _orthonormal_span(rows: torch.Tensor, images: torch.Tensor, keep: float) -> tuple:
    """An orthonormal basis of the span of ``rows`` and its images under the linear ``F``, from their Gram matrix.

    Directions of the span with a singular value under ``keep`` times the largest are dropped:
    they are rounding noise, and dividing by them would magnify the images' rounding.
    """
    scale = rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    rows, images = rows / scale, images / scale
    values, vectors = torch.linalg.eigh((rows @ rows.T).double())
    kept = values > (keep ** 2) * values[-1]
    transform = (vectors[:, kept] / values[kept].sqrt()).T.to(rows.dtype)
    return transform @ rows, transform @ images


def _ritz(basis, images, inside_weight, outside_weight, ridge, k):
    """Rayleigh-Ritz of the pencil on the orthonormal rows ``basis``: the top-``k`` Ritz vectors, images and values.

    The small pencil needs only ``F``'s images of the basis: ``v^T J_in^T J_in v = |mask F v|^2``.
    Without ``outside_weight`` the pencil is ``(J_in^T J_in, ridge I)``.
    """
    inside = ((images * inside_weight) @ images.T).double()
    outside = ridge * torch.eye(len(basis), dtype=torch.float64)
    if outside_weight is not None:
        outside = outside + ((images * outside_weight) @ images.T).double()
    lower = torch.linalg.cholesky(outside)
    reduced = torch.linalg.solve_triangular(lower, torch.linalg.solve_triangular(lower, inside, upper=False).T,
                                            upper=False)
    values, vectors = torch.linalg.eigh((reduced + reduced.T) / 2)
    coefficients = torch.linalg.solve_triangular(lower.T, vectors[:, -k:].flip(1), upper=True).T.to(basis.dtype)
    return coefficients @ basis, coefficients @ images, values[-k:].flip(0).to(basis.dtype)


def _lobpcg(jacobian: MaskedJacobian, outside_weight, ridge: float, k: int, guard: int, max_iter: int, tol: float,
            seed: int, progress, start: torch.Tensor | None = None) -> tuple:
    """The top-``k`` eigenvectors of the pencil ``(J^T J, J_out^T J_out + ridge I)`` by LOBPCG, ``k + guard`` at once.

    ``J`` is ``jacobian``; ``outside_weight`` (the squared outside mask, flat) may be None for
    ``(J^T J, ridge I)``. Each iteration searches the span of the current vectors, their
    residuals and the previous vectors (Knyazev's locally optimal block CG, no preconditioner).
    It costs one JVP of the residuals and one VJP of the vectors (twice as many covectors with
    an outside); the images of the other rows follow by linearity. Stops once every relative
    residual ``|A v - value B v| / (value |B v|)`` of the top ``k`` is at most ``tol``, or after
    ``max_iter``. With ``start`` (rows, n), the first Rayleigh-Ritz runs over the span of
    ``start`` and the random rows, which costs one more JVP of the ``start`` rows. Returns unit
    ``vectors`` (k, n), ``values``, iterations, converged, residual, the absolute ridge
    (``ridge`` is relative to the outside's mean energy when there is one), and every iterated
    vector (k + guard, n), unit length.
    """
    linearisation = jacobian.linearisation
    inside_weight = jacobian.mask.expand_as(linearisation.eps).reshape(1, -1) ** 2
    keep = math.sqrt(torch.finfo(linearisation.work_dtype).eps)

    def images_of(rows):
        jacobian.counts.update(jvp_calls=1, jvp_vectors=len(rows))
        return linearisation.jvp(rows).flatten(1)

    block = min(k + guard, linearisation.h.numel())
    basis = _orthonormal_rows(_start(jacobian, block, seed))
    images = images_of(basis)
    if outside_weight is not None:
        # The ridge in units of J_out's mean energy per direction: E |J_out v|^2 = |J_out|_F^2 / n for a random unit v.
        ridge = ridge * float((images.square() * outside_weight).sum(dim=1).mean())
    if start is not None:
        # The random rows stay in the first span: their images are paid for, and the ridge's estimate needs
        # random rows (a warm start's rows leak little, so they would understate J_out's energy).
        start = start.to(basis)
        basis, images = _orthonormal_span(torch.cat([start, basis]), torch.cat([images_of(start), images]), keep)
    vectors, vector_images, values = _ritz(basis, images, inside_weight, outside_weight, ridge, block)
    previous = previous_images = None
    for iteration in range(1, max_iter + 1):
        weights = [inside_weight] if outside_weight is None else [inside_weight, outside_weight]
        covectors = torch.cat([vector_images * weight for weight in weights])
        jacobian.counts.update(vjp_calls=1, vjp_vectors=len(covectors))
        pulled = linearisation.vjp(covectors.reshape(-1, *linearisation.eps.shape)).flatten(1)
        on_outside = ridge * vectors + (pulled[block:] if outside_weight is not None else 0)
        residuals = pulled[:block] - values[:, None] * on_outside
        turn = residuals.norm(dim=1) / (values * on_outside.norm(dim=1)).clamp_min(torch.finfo(values.dtype).tiny)
        residual = turn[:k].max().item()
        if progress is not None:
            progress(iteration)
        if residual <= tol:
            break
        rows, row_images = [vectors, residuals], [vector_images, images_of(residuals)]
        if previous is not None:
            rows.append(previous)
            row_images.append(previous_images)
        basis, images = _orthonormal_span(torch.cat(rows), torch.cat(row_images), keep)
        previous, previous_images = vectors, vector_images
        vectors, vector_images, values = _ritz(basis, images, inside_weight, outside_weight, ridge, block)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return vectors[:k], values[:k], iteration, residual <= tol, residual, ridge, vectors


@_with_autograd
def ratio_directions(linearisation: Linearisation, mask: torch.Tensor, k: int = 3, ridge: float = 1.0,
                     max_iter: int = 200, tol: float = 1e-3, seed: int = 0, progress=None,
                     start: torch.Tensor | None = None) -> RatioDirections:
    """The ``k`` directions of ``h`` with the largest ratio of inside to outside response, by LOBPCG (:func:`_lobpcg`).

    ``k + GUARD_VECTORS`` vectors are iterated; ``progress(done, max_iter)`` is called after each iteration.
    ``start`` (rows, *h.shape[1:]), e.g. an earlier search's ``block`` at a nearby ``h``, warm-starts
    the search: it begins from the best of their span and the seeded random rows.
    """
    require_positive("ridge", ridge)
    inside = MaskedJacobian(linearisation, mask)
    _check_iteration(k, max_iter, tol, linearisation.h.numel())
    if start is not None:
        require_finite_tensor("start", start)
        if start.ndim < 2 or start.shape[1:] != linearisation.h.shape[1:]:
            raise ValueError(f"start must hold rows of h's shape {tuple(linearisation.h.shape[1:])}, "
                             f"got shape {tuple(start.shape)}")
        start = start.flatten(1)
    outside_weight = (1 - inside.mask).expand_as(linearisation.eps).reshape(1, -1) ** 2
    vectors, ratios, iterations, converged, residual, ridge, block = _lobpcg(
        inside, outside_weight, ridge, k, GUARD_VECTORS, max_iter, tol, seed,
        progress and (lambda done: progress(done, max_iter)), start)
    return RatioDirections(_signed(vectors, linearisation.h.shape), ratios, ridge,
                           block.reshape(len(block), *linearisation.h.shape[1:]),
                           **_search_cost(inside.counts, iterations, converged, residual))


@_with_autograd
def refound_direction(linearisation: Linearisation, mask: torch.Tensor, previous: torch.Tensor, block: torch.Tensor,
                      index: int = 0, ridge: float = 1.0, iterations: int = 3, seed: int = 0,
                      progress=None) -> tuple:
    """``(direction, search)``: the ``index``-th ratio direction re-found at ``linearisation``'s ``h``, as an edit
    re-finds its direction at each step's state.

    The search (:func:`ratio_directions`, ``k = index + 1``, at most ``iterations`` iterations) is
    warm-started from ``block``, the previous search's; the direction is signed to agree with
    ``previous`` (a non-negative inner product), since an eigenvector's sign is arbitrary and a
    flip would reverse the edit mid-way.
    """
    found = ratio_directions(linearisation, mask, k=index + 1, ridge=ridge, max_iter=iterations, seed=seed,
                             progress=progress, start=block)
    vector = found.vectors[index]
    return (vector if (vector * previous.to(vector)).sum() >= 0 else -vector), found


CONFINEMENTS = ("ratio", "rank1", "none")


@dataclass
class RegionDirections:
    """Region directions, how they were confined and what finding them cost.

    ``vectors`` (k, *h.shape[1:]) are unit h-space directions, strongest first. ``values`` are
    their ratios ``|J_in v|^2 / (|J_out v|^2 + ridge' |v|^2)`` under ``"ratio"``, else the inside
    singular values before confinement. ``leakage`` is each direction's linearised response
    outside the mask relative to inside, ``|J_out v| / |J_in v|``. ``search`` is the ratio search
    or the inside SVD, ``outside`` the outside SVD of ``"rank1"``.
    """
    vectors: torch.Tensor
    values: torch.Tensor
    confinement: str
    search: RatioDirections | Directions
    outside: Directions | None
    leakage: torch.Tensor

    @property
    def iterations(self) -> int:
        return self.search.iterations + (self.outside.iterations if self.outside is not None else 0)

    @property
    def converged(self) -> bool:
        return self.search.converged and (self.outside is None or self.outside.converged)


@_with_autograd
def region_directions(f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, mask: torch.Tensor, k: int = 3,
                      confinement: str = "ratio", r: int = 1, ridge: float = 1.0, max_iter: int = 200,
                      tol: float = 1e-3, seed: int = 0, progress=None,
                      max_batch: int | None = None) -> RegionDirections:
    """The top-``k`` directions of ``h`` that change the masked region, confined by ``confinement``.

    ``r`` is the outside rank ``"rank1"`` projects out, ``ridge`` the relative ridge of ``"ratio"``.
    ``max_batch`` caps the vectors per pass over ``f`` (:class:`Linearisation`); the result
    depends on it only through float rounding.
    ``progress(done, total)`` is called once per iteration, over every search, and may raise to abort.
    """
    if confinement not in CONFINEMENTS:
        raise ValueError(f"confinement must be one of {CONFINEMENTS}, got {confinement!r}")
    _check_iteration(k, max_iter, tol, h.numel())
    require_at_least("r", r, 0)
    if (mask >= 1).all():
        raise ValueError("mask covers the whole image: nothing is left outside it to keep")
    inside = masked_jacobian(f, h, mask, max_batch)
    if confinement == "ratio":
        found = ratio_directions(inside.linearisation, inside.mask, k, ridge, max_iter, tol, seed, progress)
        return RegionDirections(found.vectors, found.ratios, confinement, found, None, inside.leakage(found.vectors))
    searches = 2 if confinement == "rank1" and r else 1
    total = max_iter * searches
    found = top_directions(inside, k, max_iter, tol, seed, progress and (lambda done, _: progress(done, total)))
    outside = None
    if searches == 2:
        outside = top_directions(inside.complement(), r, max_iter, tol, seed,
                                 progress and (lambda done, _: progress(max_iter + done, total)))
    vectors = found.vectors if outside is None else confine(found, outside)
    return RegionDirections(vectors, found.singular_values, confinement, found, outside, inside.leakage(vectors))
