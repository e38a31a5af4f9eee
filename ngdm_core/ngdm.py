"""NGDM: a soft weight map and sampling where each pixel starts denoising at its own time.

Pixel ``k`` noised at rate ``lambda_k * beta(t)`` matches an isotropic process run to a
shorter time with ``alpha_bar(T_k) = alpha_bar(T) ** lambda_k`` (the paper's Lemma 1). In
sigma form this is ``sigma_k = sqrt((1 + sigma_T^2) ** lambda_k - 1)``, which needs no beta
schedule, so it serves any VP model and, through the same-SNR mapping, flow models.
"""

import torch
import torch.nn.functional as F

from .samplers import sample_euler
from .schedule import FLOW_MAX_VP_SIGMA, check_parametrization, flow_to_vp_sigma, noise_source, vp_to_flow_sigma
from .validation import (require_at_least, require_finite_number, require_finite_tensor, require_map_matches,
                         require_positive, require_sigma_schedule, require_unit_interval)

MAPPINGS = ("ngdm", "linear")
START_RULES = ("first_at_or_below", "last_at_or_above")
WEIGHT_MAP_MODES = ("ngdm", "diffedit")


def power_law_start_sigmas(weights: torch.Tensor, sigma_max, parametrization: str = "vp") -> torch.Tensor:
    """Per-pixel start sigma ``sqrt((1 + sigma_max^2) ** weights - 1)``: 0 for weight 0, ``sigma_max`` for 1."""
    check_parametrization(parametrization)
    sigma_max = torch.as_tensor(sigma_max, dtype=weights.dtype, device=weights.device)
    vp_max = sigma_max
    if parametrization == "flow":
        vp_max = torch.clamp(flow_to_vp_sigma(sigma_max), max=FLOW_MAX_VP_SIGMA)
    # expm1/log1p keep small weights accurate, where (1 + s^2) ** w - 1 would cancel.
    start = torch.sqrt(torch.expm1(weights * torch.log1p(vp_max**2)))
    if parametrization == "flow":
        start = vp_to_flow_sigma(start)
    # Weight 1 must start exactly at the first step, not a rounding error below it.
    return torch.where(weights >= 1, sigma_max, start)


def linear_start_sigmas(weights: torch.Tensor, sigmas: torch.Tensor, to_timestep=None, to_sigma=None,
                        sigma_min: float = 0.0) -> torch.Tensor:
    """ComfyUI DifferentialDiffusion's mapping: a pixel starts once the normalised timestep drops to its weight.

    ``to_timestep``/``to_sigma`` are the model's conversions (ComfyUI's ``model_sampling.timestep``
    and ``.sigma``), and the end of the range is ``max(sigma_min, sigmas[-1])`` as in
    DifferentialDiffusion. Both conversions are required: the mapping is linear in the model's
    timestep, and an identity stand-in would make it linear in sigma, starting far higher
    (at weight 0.5 over 20 steps of the shapes model's schedule, sigma 79 instead of 3.4).
    """
    if to_timestep is None or to_sigma is None:
        raise ValueError("the linear mapping needs the model's timestep conversions: pass to_timestep and to_sigma "
                         "(ComfyUI's model_sampling.timestep and .sigma)")
    sigma_from = sigmas[0]
    sigma_to = torch.clamp(sigmas[-1], min=sigma_min)
    t_from, t_to = to_timestep(sigma_from), to_timestep(sigma_to)
    start = to_sigma(t_to + weights * (t_from - t_to)).to(weights.dtype)
    return torch.where(weights >= 1, sigma_from.to(weights.dtype), start)


def last_step_at_or_above(start: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each start moved up to the smallest step sigma at or above it (Algorithm 1's smallest grid time >= T_k).

    A start of 0 (weight 0) stays 0: such a pixel never starts.
    """
    grid = sigmas[:-1][sigmas[:-1] > 0].flip(0).to(start)  # the sampled levels, ascending
    index = torch.searchsorted(grid, start.contiguous()).clamp(max=len(grid) - 1)
    return torch.where(start > 0, grid[index], start)


def start_sigmas(weights: torch.Tensor, sigmas: torch.Tensor, mapping: str = "ngdm", parametrization: str = "vp",
                 to_timestep=None, to_sigma=None, sigma_min: float = 0.0,
                 start_rule: str = "first_at_or_below") -> torch.Tensor:
    """Per-pixel start sigma for a run over ``sigmas`` with weights in [0, 1].

    ``start_rule`` says at which step a pixel whose start falls between two steps begins:
    ``"first_at_or_below"`` (the default) at the first step with ``sigma <= sigma_k``, so no
    pixel is ever noised above its weight's level, as DifferentialDiffusion's threshold does;
    ``"last_at_or_above"`` one step earlier, at the smallest step sigma ``>= sigma_k``, as the
    paper's Algorithm 1 is written. They agree where ``sigma_k`` is a step of the schedule.
    """
    if start_rule not in START_RULES:
        raise ValueError(f"start_rule must be one of {START_RULES}, got {start_rule!r}")
    if mapping == "ngdm":
        start = power_law_start_sigmas(weights, sigmas[0], parametrization)
    elif mapping == "linear":
        start = linear_start_sigmas(weights, sigmas, to_timestep, to_sigma, sigma_min)
    else:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    return last_step_at_or_above(start, sigmas) if start_rule == "last_at_or_above" else start


def started(sigma, start: torch.Tensor) -> torch.Tensor:
    """True where a pixel is denoised at noise level ``sigma``: it has started once ``sigma <= sigma_k``.

    A pixel whose start is 0 (weight 0) never starts, even if a sampler evaluates at sigma = 0.
    """
    sigma = torch.as_tensor(sigma, device=start.device).reshape(-1, *([1] * (start.ndim - 1)))
    return (sigma <= start) & (start > 0)


def noised_source_reference(source: torch.Tensor, noise: torch.Tensor, parametrization: str = "vp"):
    """Where a held pixel sits at ``sigma`` in plain NGDM: the source noised along the one noise, predicting the source."""
    return lambda sigma: (noise_source(source, noise, sigma, parametrization), source)


def per_pixel_time_denoiser(model, reference, sigmas: torch.Tensor, start: torch.Tensor):
    """Wrap ``model(x, sigma, **kw) -> x0`` so pixels that have not started follow ``reference``.

    ``reference(sigma)`` gives the state a held pixel has at ``sigma`` and the prediction that
    carries it to the next one: the noised source and the source for plain NGDM
    (:func:`noised_source_reference`), or an inverted trajectory and its own predictions.

    Before every model call, each pixel that was still held at the schedule's previous sigma
    is reset to the reference state (Algorithm 1, line 7): held pixels stay on it, and a pixel
    starts from it. The reset writes into ``x`` in place because ``x`` is the sampler's own
    state: that is how ancestral and SDE samplers, which add fresh noise between calls, keep
    the reference's noise. Where a pixel is held, the prediction is the reference's.
    """
    def denoise(x, sigma, **extra_args):
        hold = ~started(sigma, start)
        earlier = sigmas[sigmas > torch.as_tensor(sigma).reshape(-1)[0].to(sigmas)]
        reset = ~started(earlier.min(), start) if earlier.numel() else hold
        state, prediction = reference(sigma)
        x.copy_(torch.where(reset, state, x))
        return torch.where(hold, prediction, model(x, sigma, **extra_args))

    return denoise


def require_sampling_inputs(source: torch.Tensor, name: str, weights: torch.Tensor, sigmas: torch.Tensor,
                            noise: torch.Tensor) -> None:
    """What sampling a source under a per-pixel map needs: a finite source, a map in [0, 1] that fits it, a schedule, one noise."""
    require_finite_tensor("source", source)
    require_map_matches(name, weights, source)
    require_unit_interval(name, weights)
    require_sigma_schedule("sigmas", sigmas)
    if noise.shape != source.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but source has {tuple(source.shape)}")


def sample_per_pixel_time(denoiser, source: torch.Tensor, weights: torch.Tensor, sigmas: torch.Tensor,
                          noise: torch.Tensor, cond=None, sampler=sample_euler, mapping: str = "ngdm",
                          parametrization: str = "vp", callback=None, conversions: dict | None = None,
                          start_rule: str = "first_at_or_below", **sampler_options) -> torch.Tensor:
    """Algorithm 1 over any ``denoiser(x, sigma, cond) -> x0`` and any ``sampler(model, x, sigmas, ...)``.

    ``weights`` is Lambda, shaped like ``source`` or with one channel. A weight-0 pixel returns
    the source exactly, a weight-1 pixel is sampled from ``sigmas[0]`` as plain sampling would.
    ``conversions`` holds :func:`start_sigmas`' ``to_timestep``, ``to_sigma`` and ``sigma_min``
    (the linear mapping needs them); ``start_rule`` is :func:`start_sigmas`'.
    """
    require_sampling_inputs(source, "weights", weights, sigmas, noise)
    start = start_sigmas(weights.to(source.dtype), sigmas, mapping, parametrization, **(conversions or {}),
                         start_rule=start_rule)
    model = per_pixel_time_denoiser(lambda x, sigma: denoiser(x, sigma, cond),
                                    noised_source_reference(source, noise, parametrization), sigmas, start)
    x = noise_source(source, noise, sigmas[0], parametrization)
    return sampler(model, x, sigmas, callback=callback, **sampler_options)


@torch.no_grad()
def prompt_difference(denoiser, source: torch.Tensor, source_cond, target_cond, sigma: float, noise: torch.Tensor,
                      parametrization: str = "vp", max_batch: int | None = None, progress=None) -> torch.Tensor:
    """Mean over seeds and channels of ``|D(x, sigma, target) - D(x, sigma, source)|``, shaped like ``source`` with one channel.

    ``noise`` holds one noise per seed, shape (N, *source.shape). All seeds go through one
    model call per prompt, or ``max_batch`` seeds per call when memory is short. The map is
    taken on the x0 predictions: at one sigma they differ from the noise predictions by a
    constant factor, which the normalisation of the weight map removes.
    """
    num_maps, batch = noise.shape[0], source.shape[0]
    seeds_per_call = min(max_batch or num_maps, num_maps)
    noisy = noise_source(source.repeat(num_maps, *([1] * (source.ndim - 1))), noise.reshape(-1, *source.shape[1:]),
                         sigma, parametrization)
    calls = 2 * -(-num_maps // seeds_per_call)
    total = torch.zeros(batch, 1, *source.shape[2:], dtype=source.dtype, device=source.device)
    done = 0
    for first in range(0, num_maps * batch, seeds_per_call * batch):
        x = noisy[first:first + seeds_per_call * batch]
        sigma_batch = torch.full((x.shape[0],), float(sigma), dtype=source.dtype, device=source.device)
        predictions = []
        for cond in (target_cond, source_cond):
            predictions.append(denoiser(x, sigma_batch, cond))
            done += 1
            if progress is not None:
                progress(done, calls)
        difference = (predictions[0] - predictions[1]).abs().mean(dim=1, keepdim=True)
        total += difference.reshape(-1, *total.shape).sum(dim=0)
    return total / num_maps


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the last two axes of (B, C, H, W) or (B, C, F, H, W), reflected borders, ``sigma`` in pixels."""
    if sigma <= 0:
        return image
    radius = max(1, int(3 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    height, width = image.shape[-2:]
    # Every (H, W) plane blurred on its own, as a batch of one-channel images.
    blurred = image.reshape(-1, 1, height, width)
    for dim, size in ((-1, width), (-2, height)):
        # Reflection needs the pad to be smaller than the image; tiny latents fall back to replicate.
        mode = "reflect" if radius < size else "replicate"
        pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
        shape = (1, 1, 1, -1) if dim == -1 else (1, 1, -1, 1)
        blurred = F.conv2d(F.pad(blurred, pad, mode=mode), kernel.reshape(shape))
    return blurred.reshape(image.shape)


def normalize_per_item(maps: torch.Tensor) -> torch.Tensor:
    """Rescale each batch item to [0, 1]; a constant map (identical prompts) becomes all zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.reshape(-1, *([1] * (maps.ndim - 1)))
    span = flat.max(dim=1).values.reshape(low.shape) - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(maps))


def ngdm_weights(difference: torch.Tensor, smoothing: float = 1.0, a: float = 10.0, b: float = 5.0,
                 zero_floor: bool = False) -> torch.Tensor:
    """NGDM's soft map: smooth, normalise to [0, 1], then ``sigmoid(a * A - b)``.

    The paper's sigmoid never reaches 0 (Lambda >= sigmoid(-b)), so every pixel of the
    background is re-noised a little. ``zero_floor`` (a departure from the paper) rescales the
    sigmoid affinely so that A = 0 gives exactly 0 and A = 1 gives 1: the least-changed pixels
    then stay the source exactly.
    """
    require_positive("a", a)
    require_finite_number("b", b)
    require_finite_number("smoothing", smoothing)
    if smoothing < 0:
        raise ValueError(f"smoothing must be non-negative, got {smoothing}")
    normalized = normalize_per_item(gaussian_blur(difference, smoothing))
    weights = torch.sigmoid(a * normalized - b)
    if not zero_floor:
        return weights
    low, high = torch.sigmoid(torch.tensor(-b, dtype=torch.float64)), torch.sigmoid(torch.tensor(a - b, dtype=torch.float64))
    # Exactly 0 where A = 0, whatever the sigmoid's rounding (a constant map is A = 0 everywhere).
    return torch.where(normalized > 0, ((weights - float(low)) / float(high - low)).clamp(0, 1), torch.zeros_like(weights))


def diffedit_mask(difference: torch.Tensor, clamp_ratio: float = 3.0) -> torch.Tensor:
    """DiffEdit's binary map (diffusers ``generate_mask``): clamp at ``clamp_ratio`` times the mean, rescale, threshold 0.5."""
    clamp = difference.flatten(1).mean(dim=1).reshape(-1, *([1] * (difference.ndim - 1))) * clamp_ratio
    scaled = torch.minimum(difference, clamp) / torch.where(clamp > 0, clamp, torch.ones_like(clamp))
    return (scaled > 0.5).to(difference.dtype)


def map_noise(source: torch.Tensor, num_maps: int, seed: int) -> torch.Tensor:
    """The ``num_maps`` seeded noises a weight map averages over, shape ``(num_maps, *source.shape)``."""
    noise = torch.randn((num_maps, *source.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return noise.to(device=source.device, dtype=source.dtype)


def weight_map(denoiser, source: torch.Tensor, source_cond, target_cond, sigma: float, num_maps: int = 10,
               seed: int = 0, mode: str = "ngdm", smoothing: float = 1.0, a: float = 10.0, b: float = 5.0,
               parametrization: str = "vp", max_batch: int | None = None, progress=None,
               zero_floor: bool = False) -> torch.Tensor:
    """Lambda for editing ``source`` from ``source_cond`` to ``target_cond``, in [0, 1].

    The shape is the source's with one channel: (B, 1, H, W), or (B, 1, F, H, W) for a 5-D source.

    The source is noised to ``sigma`` with ``num_maps`` seeded noises; ``mode`` is ``"ngdm"``
    (soft, the paper's section 3.4, with ``zero_floor`` as :func:`ngdm_weights` says) or
    ``"diffedit"`` (binary, for comparison).

    With plain classifier-free guidance the guided difference is ``cfg`` times the conditional
    one (the unconditional prediction is the same for both prompts and cancels), and both maps
    are invariant to that scale, so ``denoiser`` may be the unguided conditional model: the same
    map for half the model evaluations.
    """
    require_finite_tensor("source", source)
    require_at_least("number of maps", num_maps, 1)
    require_positive("sigma", sigma)
    if mode not in WEIGHT_MAP_MODES:
        raise ValueError(f"mode must be one of {WEIGHT_MAP_MODES}, got {mode!r}")
    if mode == "ngdm":
        # Checked before any model call, so a bad knob fails at once.
        ngdm_weights(torch.zeros(1, 1, 1, 1), smoothing, a, b, zero_floor)
    difference = prompt_difference(denoiser, source, source_cond, target_cond, sigma,
                                   map_noise(source, num_maps, seed), parametrization,
                                   max_batch, progress)
    if mode == "diffedit":
        return diffedit_mask(difference)
    return ngdm_weights(difference, smoothing, a, b, zero_floor)
