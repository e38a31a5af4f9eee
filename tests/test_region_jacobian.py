import dataclasses
import math

import pytest
import torch
from torch import nn

import scipy.linalg

from ngdm_core.region_jacobian import (GUARD_VECTORS, Directions, confine, masked_jacobian, ratio_directions,
                                       refound_direction, region_directions, top_directions, top_directions_sequential)

H_SHAPE, EPS_SHAPE = (1, 6, 3, 3), (1, 2, 6, 6)
VARIANTS = [top_directions, top_directions_sequential]


def randn(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def linear_map(seed=0):
    """``A = U diag(s) V^T`` from h (54 entries) to eps (72), with singular values 10 * 0.6^i."""
    n, m = math.prod(H_SHAPE), math.prod(EPS_SHAPE)
    left = torch.linalg.qr(randn((m, n), seed)).Q
    right = torch.linalg.qr(randn((n, n), seed + 1)).Q
    return (left * (10 * 0.6 ** torch.arange(n, dtype=torch.float64))) @ right.T


def linear_model(matrix):
    return lambda h: (matrix @ h.flatten()).reshape(EPS_SHAPE)


def soft_mask():
    """Three rows fully inside, one half inside: J = diag(mask) A must weigh by the mask, not its square."""
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    mask[..., :3, :] = 1
    mask[..., 3, :] = 0.5
    return mask


def expected_directions(matrix, mask, k):
    """The top right singular vectors and values of ``diag(mask) A``, straight from torch.linalg.svd."""
    _, values, right = torch.linalg.svd(mask.expand(EPS_SHAPE).flatten()[:, None] * matrix)
    return right[:k].reshape(k, *H_SHAPE[1:]), values[:k]


def abs_cosines(a, b):
    return (a.flatten(1) * b.flatten(1)).sum(1).abs() / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))


def assert_same_directions(found: Directions, vectors, values):
    assert found.vectors.shape == vectors.shape
    assert (abs_cosines(found.vectors, vectors) >= 0.999).all()
    torch.testing.assert_close(found.singular_values, values, rtol=1e-4, atol=0)


class SmallDecoder(nn.Sequential):
    """h (1, 8, 4, 4) -> upsample, 3x3 conv, SiLU, upsample, 3x3 conv -> eps (1, 4, 16, 16)."""

    def __init__(self, seed=0):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            super().__init__(nn.Upsample(scale_factor=2), nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(),
                             nn.Upsample(scale_factor=2), nn.Conv2d(16, 4, 3, padding=1))


class BottleneckDecoder(nn.Module):
    """h (1, 8, 8, 8) -> eps (1, 4, 32, 32): each h pixel paints its own 4x4 block (1x1 convolutions
    after upsampling), and the spatial mean of h shifts the colour of every pixel, as the global
    mixing of a U-Net bottleneck does. That global shift is the leakage confinement removes; 3x3
    convolutions would add leakage across the mask's edge spread over many outside directions,
    which no rank-1 projection removes (measured: only 2-4x less leakage)."""

    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.local = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 16, 1), nn.SiLU(),
                                       nn.Upsample(scale_factor=2), nn.Conv2d(16, 4, 1))
            self.mix = nn.Linear(8, 1)
            self.colour = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, h):
        shift = torch.tanh(self.mix(h.mean(dim=(-2, -1))))[..., None, None]
        return self.local(h) + 4 * shift * self.colour


def rectangle_mask(size, rows, cols, dtype=torch.float32):
    mask = torch.zeros(1, 1, size, size, dtype=dtype)
    mask[..., rows[0]:rows[1], cols[0]:cols[1]] = 1
    return mask


def response_leakage(change, mask):
    return (((1 - mask) * change).norm() / (mask * change).norm()).item()


# --- the operators -----------------------------------------------------------------------------

def test_products_match_the_explicit_masked_jacobians():
    net = SmallDecoder().double()
    h, mask = randn((1, 8, 4, 4)), torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1),
                                              dtype=torch.float64)
    full = torch.autograd.functional.jacobian(net, h).reshape(4 * 16 * 16, 8 * 4 * 4)
    vectors, covectors = randn((3, 8, 4, 4), 2), randn((3, 1, 4, 16, 16), 3)
    inside = masked_jacobian(net, h, mask)
    for jacobian, weights in [(inside, mask), (inside.complement(), 1 - mask)]:
        explicit = weights.expand(1, 4, 16, 16).flatten()[:, None] * full
        torch.testing.assert_close(jacobian.jvp(vectors).flatten(1), vectors.flatten(1) @ explicit.T)
        torch.testing.assert_close(jacobian.vjp(covectors).flatten(1), covectors.flatten(1) @ explicit)
    assert dict(inside.counts) == {"jvp_calls": 1, "jvp_vectors": 3, "vjp_calls": 1, "vjp_vectors": 3}


# --- power iteration on a linear map with a known SVD -----------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mask", [torch.ones(1, 1, 6, 6, dtype=torch.float64), soft_mask()], ids=["all", "soft"])
def test_power_iteration_finds_the_top_singular_directions_of_a_linear_map(variant, mask):
    matrix = linear_map()
    found = variant(masked_jacobian(linear_model(matrix), randn(H_SHAPE), mask), k=3)
    assert found.converged and found.residual <= 1e-5
    assert_same_directions(found, *expected_directions(matrix, mask, 3))


def test_sequential_deflation_agrees_with_block_iteration():
    jacobian = masked_jacobian(linear_model(linear_map(seed=5)), randn(H_SHAPE), soft_mask())
    block, sequential = top_directions(jacobian, k=3), top_directions_sequential(jacobian, k=3)
    assert block.converged and sequential.converged
    assert_same_directions(sequential, block.vectors, block.singular_values)


def test_products_are_counted_per_call_and_per_vector():
    jacobian = masked_jacobian(linear_model(linear_map()), randn(H_SHAPE), soft_mask())
    block = top_directions(jacobian, k=3)
    assert block.jvp_calls == block.vjp_calls == block.iterations
    assert block.jvp_vectors == block.vjp_vectors == 3 * block.iterations
    sequential = top_directions_sequential(jacobian, k=3)
    assert sequential.jvp_calls == sequential.jvp_vectors == sequential.vjp_vectors == sequential.iterations
    assert sequential.iterations > block.iterations


def test_same_seed_repeats_and_other_seeds_find_the_same_subspace():
    jacobian = masked_jacobian(linear_model(linear_map()), randn(H_SHAPE), soft_mask())
    first, again, other = (top_directions(jacobian, seed=seed) for seed in (0, 0, 7))
    assert torch.equal(first.vectors, again.vectors) and torch.equal(first.singular_values, again.singular_values)
    assert (abs_cosines(first.vectors, other.vectors) >= 0.999).all()


def test_an_unconverged_run_says_so():
    jacobian = masked_jacobian(linear_model(linear_map()), randn(H_SHAPE), soft_mask())
    found = top_directions(jacobian, k=3, max_iter=2)
    assert found.iterations == 2 and not found.converged and found.residual > 1e-5


# --- confinement ----------------------------------------------------------------------------------

def test_confine_with_one_outside_direction_is_the_authors_projection():
    inside, outside = randn((3, 6, 3, 3), 1), 3 * randn((1, 6, 3, 3), 2)
    u, u_out = inside.flatten(1), outside.flatten(1)
    expected = u - (u @ u_out.T) / (u_out @ u_out.T) * u_out
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(confine(inside, outside).flatten(1), expected)


def test_confine_removes_the_whole_outside_subspace():
    outside = randn((2, 6, 3, 3), 2)
    confined = confine(randn((3, 6, 3, 3), 1), outside).flatten(1)
    torch.testing.assert_close(confined.norm(dim=1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(confined @ outside.flatten(1).T, torch.zeros(3, 2, dtype=torch.float64))


def test_confine_refuses_a_direction_inside_the_outside_subspace():
    outside = randn((2, 6, 3, 3), 2)
    with pytest.raises(ValueError, match="inside direction 1 lies in the outside subspace"):
        confine(torch.stack([randn((6, 3, 3), 1), outside[0] - 2 * outside[1]]), outside)
    with pytest.raises(ValueError, match="outside_basis"):
        confine(randn((1, 6, 3, 3)), randn((1, 6, 9)))


def test_confinement_cuts_the_leakage_of_the_top_direction_of_a_nonlinear_net():
    net, h = BottleneckDecoder(), randn((1, 8, 8, 8), dtype=torch.float32)
    mask = rectangle_mask(32, rows=(8, 12), cols=(8, 16))
    found = region_directions(net, h, mask, k=3, confinement="rank1", r=1)
    before, after = masked_jacobian(net, h, mask).leakage(found.search.vectors)[0].item(), found.leakage[0].item()
    # Measured 5.40 -> 0.128 (42x). The top inside direction is mostly the global shift, so it
    # leaks about sqrt(A_out / A_in) = 5.6 for this 32-of-1024-pixel mask. Confined, what is left
    # are the local tilts of the inside and outside directions, which leak about
    # sqrt(A_in / A_out) = 0.18 times a factor measured at 0.4-2.0 over 8 seeds and 3 masks:
    # the reduction is about A_out / A_in = 31, and 3 * sqrt(A_in / A_out) bounds what is left.
    area_in = mask.sum().item()
    assert before >= 10 * after
    assert after <= 3 * math.sqrt(area_in / (mask.numel() - area_in))
    # The rank-1 guarantee: a unit direction orthogonal to the top outside one responds outside
    # by at most the second outside singular value (loose here, 2.7, as the local outside modes
    # are as strong as the inside response).
    inside = masked_jacobian(net, h, mask)
    second_outside = top_directions(inside.complement(), k=2, max_iter=200).singular_values[1]
    assert after <= 1.01 * (second_outside / inside.jvp(found.vectors[:1]).norm()).item()
    # The actual change of a small step (a hundredth of |h|), not only the linearisation.
    alpha = 1e-2 * h.norm()
    with torch.no_grad():
        step_before = response_leakage(net(h + alpha * found.search.vectors[0]) - net(h), mask)
        step_after = response_leakage(net(h + alpha * found.vectors[0]) - net(h), mask)
    assert step_before == pytest.approx(before, rel=0.05) and step_after == pytest.approx(after, rel=0.05)
    assert step_before >= 10 * step_after


@pytest.mark.parametrize("confinement, r", [("none", 1), ("rank1", 0)])
def test_without_outside_directions_nothing_is_confined(confinement, r):
    found = region_directions(linear_model(linear_map()), randn(H_SHAPE), soft_mask(), k=2, confinement=confinement, r=r)
    assert found.outside is None and torch.equal(found.vectors, found.search.vectors)
    assert torch.equal(found.values, found.search.singular_values)


# --- the ratio confinement: a generalised eigenproblem --------------------------------------------

def outside_heavy_map(seed=3):
    """A linear map whose strongest directions drive the outside: the top inside directions leak, the best ratios do not."""
    matrix = linear_map(seed)
    outside = (1 - soft_mask()).expand(EPS_SHAPE).flatten()[:, None]
    return matrix * (1 + 4 * outside)


def expected_ratio_directions(matrix, mask, ridge, k):
    """The top generalised eigenvectors of ``(A_in^T A_in, A_out^T A_out + ridge I)``, straight from scipy."""
    weight = mask.expand(EPS_SHAPE).flatten()[:, None]
    inside, outside = (weight * matrix).numpy(), ((1 - weight) * matrix).numpy()
    values, vectors = scipy.linalg.eigh(inside.T @ inside, outside.T @ outside + ridge * torch.eye(matrix.shape[1]).numpy())
    vectors = torch.from_numpy(vectors[:, ::-1][:, :k].T.copy())
    return vectors.reshape(k, *H_SHAPE[1:]), torch.from_numpy(values[::-1][:k].copy())


@pytest.mark.parametrize("ridge", [1e-2, 1.0])
def test_ratio_directions_are_the_generalised_eigenvectors_of_a_linear_map(ridge):
    matrix, mask = outside_heavy_map(), soft_mask()
    found = region_directions(linear_model(matrix), randn(H_SHAPE), mask, k=3, confinement="ratio", ridge=ridge,
                              tol=1e-6, max_iter=500)
    assert found.converged and found.search.residual <= 1e-6 and found.iterations == found.search.iterations
    # The ridge is relative to J_out's mean energy per direction; the absolute one is reported.
    vectors, values = expected_ratio_directions(matrix, mask, found.search.ridge, 3)
    assert (abs_cosines(found.vectors, vectors) >= 0.999).all()
    torch.testing.assert_close(found.values, values, rtol=1e-4, atol=0)
    torch.testing.assert_close(found.vectors.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_ratio_directions_leak_less_than_the_top_inside_ones_and_the_authors_rank1():
    matrix, mask, h = outside_heavy_map(), soft_mask(), randn(H_SHAPE)
    leakage = {confinement: region_directions(linear_model(matrix), h, mask, k=3, confinement=confinement).leakage
               for confinement in ("ratio", "rank1", "none")}
    assert (leakage["ratio"] < leakage["rank1"]).all() and (leakage["ratio"] < leakage["none"]).all()


def test_the_ratio_search_costs_one_jvp_and_one_vjp_per_iteration():
    jacobian = masked_jacobian(linear_model(outside_heavy_map()), randn(H_SHAPE), soft_mask())
    found = ratio_directions(jacobian.linearisation, jacobian.mask, k=2)
    assert found.converged and found.jvp_calls == found.iterations and found.vjp_calls == found.iterations
    unconverged = ratio_directions(jacobian.linearisation, jacobian.mask, k=2, max_iter=2)
    assert unconverged.iterations == 2 and not unconverged.converged and unconverged.residual > 1e-3


def test_a_search_started_from_a_converged_block_converges_at_its_first_iteration_to_the_same_directions():
    """Rayleigh-Ritz over a span holding the converged block keeps its residual near the cold search's (1e-8).

    The warm search's tolerance is 100 times looser, so it stops at its first residual check; what it
    pays is the JVPs of its random rows and of the start rows, then one VJP of both covector halves.
    Both use seed 0: the ridge is relative to ``J_out``'s energy estimated on the seeded random rows,
    so another seed would set another absolute ridge, another pencil.
    """
    matrix, mask = outside_heavy_map(), soft_mask()
    jacobian = masked_jacobian(linear_model(matrix), randn(H_SHAPE), mask)
    cold = ratio_directions(jacobian.linearisation, jacobian.mask, k=2, tol=1e-8, max_iter=500)
    warm = ratio_directions(jacobian.linearisation, jacobian.mask, k=2, tol=1e-6, start=cold.block)
    assert cold.converged and cold.iterations > 1 and warm.converged and warm.iterations == 1
    assert cold.block.shape == (2 + GUARD_VECTORS, *H_SHAPE[1:])
    torch.testing.assert_close(cold.block.flatten(1).norm(dim=1), torch.ones(len(cold.block), dtype=torch.float64))
    assert warm.ridge == cold.ridge
    vectors, _ = expected_ratio_directions(matrix, mask, warm.ridge, 2)
    assert (abs_cosines(warm.vectors, vectors) >= 0.999).all()
    assert warm.jvp_vectors == 2 * len(cold.block) and warm.vjp_vectors == 2 * len(cold.block)
    with pytest.raises(ValueError, match="start must hold rows of h's shape"):
        ratio_directions(jacobian.linearisation, jacobian.mask, k=2, start=randn((2, 5, 3, 3)))


def test_a_refound_direction_is_the_indexed_ratio_direction_signed_to_agree_with_the_previous_one():
    matrix, mask = outside_heavy_map(), soft_mask()
    jacobian = masked_jacobian(linear_model(matrix), randn(H_SHAPE), mask)
    cold = ratio_directions(jacobian.linearisation, jacobian.mask, k=2, tol=1e-8, max_iter=500)
    for index in (0, 1):
        vector = cold.vectors[index]
        for previous in (vector, -vector):
            direction, search = refound_direction(jacobian.linearisation, jacobian.mask, previous, cold.block, index,
                                                  iterations=3)
            # From a converged block the warm search lands on the same direction (the test above): the sign
            # is then the previous one's, whichever it was.
            assert search.vectors.shape[0] == index + 1 and search.iterations <= 3
            assert abs_cosines(direction[None], vector[None]).item() >= 0.999
            assert (direction * previous).sum() > 0
            torch.testing.assert_close(direction.norm(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("confinement", ["ratio", "rank1"])
def test_products_in_chunks_find_the_same_directions(confinement):
    """``max_batch`` splits every block of products into passes of at most that many vectors.

    Each product is the same sum in float64 whatever the chunk, so it changes only by rounding
    (about 54 * 2.2e-16 relative for these 54 x 72 products); the search amplifies that by at most
    the inverse relative gap of the singular values (0.4 here) per iteration, over at most 200
    iterations: far below 1e-9.
    """
    matrix, mask, h = outside_heavy_map(), soft_mask(), randn(H_SHAPE)
    passes = {None: 0, 2: 0}

    def counted(max_batch):
        def model(h):
            passes[max_batch] += 1
            return linear_model(matrix)(h)
        return region_directions(model, h, mask, k=3, confinement=confinement, max_batch=max_batch)
    whole, chunked = counted(None), counted(2)
    torch.testing.assert_close(chunked.vectors, whole.vectors, rtol=0, atol=1e-9)
    torch.testing.assert_close(chunked.values, whole.values, rtol=1e-9, atol=0)
    assert chunked.iterations == whole.iterations
    # One pass builds the VJP and one measures the 3 directions' leakage; under vmap a block of n
    # vectors is one pass of f, or ceil(n / 2) passes in chunks of 2.
    searches = [chunked.search] + ([chunked.outside] if chunked.outside else [])
    assert passes[None] == 2 + sum(search.jvp_calls for search in searches)
    assert passes[2] >= 1 + 2 + sum(search.jvp_vectors for search in searches) / 2


# --- use from a ComfyUI node -------------------------------------------------------------------------

def tensors_of(found):
    for field in dataclasses.fields(found):
        value = getattr(found, field.name)
        if isinstance(value, torch.Tensor):
            yield value
        elif dataclasses.is_dataclass(value):
            yield from tensors_of(value)


def test_works_in_inference_mode_and_leaves_no_graph():
    net = BottleneckDecoder()
    with torch.inference_mode():
        h = randn((1, 8, 8, 8), dtype=torch.float32)
        found = region_directions(net, h, rectangle_mask(32, rows=(8, 12), cols=(8, 16)), k=2, confinement="rank1",
                                  max_iter=5)
        ratio = region_directions(net, h, rectangle_mask(32, rows=(8, 12), cols=(8, 16)), k=2, max_iter=5)
    assert found.vectors.shape == ratio.vectors.shape == (2, 8, 8, 8) and found.outside.vectors.shape == (1, 8, 8, 8)
    for tensor in [*tensors_of(found), *tensors_of(ratio)]:
        assert not tensor.requires_grad and tensor.grad_fn is None
    assert all(parameter.grad is None for parameter in net.parameters())


@pytest.mark.parametrize("confinement, total", [("rank1", 60), ("ratio", 30)])
def test_progress_is_reported_once_per_iteration_and_can_abort(confinement, total):
    calls = []
    found = region_directions(linear_model(linear_map()), randn(H_SHAPE), soft_mask(), confinement=confinement,
                              max_iter=30, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == found.iterations
    assert [done for done, _ in calls] == sorted({done for done, _ in calls}) and {t for _, t in calls} == {total}

    def cancel(done, total):
        raise InterruptedError("cancelled")
    with pytest.raises(InterruptedError):
        region_directions(linear_model(linear_map()), randn(H_SHAPE), soft_mask(), progress=cancel)


def test_inputs_are_not_mutated():
    h, mask = randn(H_SHAPE), soft_mask()
    h_before, mask_before = h.clone(), mask.clone()
    region_directions(linear_model(linear_map()), h, mask)
    assert torch.equal(h, h_before) and torch.equal(mask, mask_before)


def with_nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


@pytest.mark.parametrize("change, message", [
    ({"mask": torch.zeros(1, 1, 6, 6, dtype=torch.float64)}, "mask is empty"),
    ({"mask": torch.ones(1, 1, 6, 6, dtype=torch.float64)}, "mask covers the whole image"),
    ({"mask": torch.ones(1, 1, 5, 6, dtype=torch.float64) / 2}, "mask is \\(5, 6\\) pixels"),
    ({"mask": with_nan(soft_mask())}, "mask contains NaN"),
    ({"h": with_nan(randn(H_SHAPE))}, "h contains NaN"),
    ({"h": randn((2, 6, 3, 3))}, "h must hold one image"),
    ({"k": 0}, "k must be at least 1"),
    ({"r": -1}, "r must be at least 0"),
    ({"max_iter": 0}, "max_iter must be at least 1"),
    ({"tol": 0.0}, "tol must be positive"),
    ({"ridge": 0.0}, "ridge must be positive"),
    ({"confinement": "rank2"}, "confinement must be one of"),
    ({"max_batch": 0}, "max_batch must be at least 1"),
])
def test_bad_input_raises_naming_it(change, message):
    arguments = {"h": randn(H_SHAPE), "mask": soft_mask(), **change}
    with pytest.raises(ValueError, match=message):
        region_directions(linear_model(linear_map()), **arguments)
