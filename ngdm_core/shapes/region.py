"""Region Jacobian directions on the shapes model, without ComfyUI: its bottleneck function and edits along a direction.

A region edit here is an SDEdit under the source's own class (:func:`.edits.sdedit`) whose
U-Net has its bottleneck shifted by ``strength * direction`` on every call, cond and uncond,
while the timestep lies in a range. The directions are found at the edit's first state,
from the same seeded noise, so an edit at strength 0 is the plain reconstruction and the
difference between the two is the direction's effect alone. The shift may be scaled per step
(:func:`strength_schedule`), or the direction re-found at every step from the edited state
(:func:`reprojected_edit`), as issue #23's candidates for confinement over the whole edit.
"""

import copy
from dataclasses import dataclass

import torch

from ..region_jacobian import Linearisation, RatioDirections, RegionDirections, refound_direction, region_directions
from ..schedule import noise_source
from ..samplers import sample_euler
from .edits import PRESERVE_MARGIN, START_NOISE, EditSettings, dilated, guided, item_noise, sdedit, truncated_sigmas
from .model import ShapesDenoiser


def edit_start(denoiser: ShapesDenoiser, source: torch.Tensor, settings: EditSettings, strength: float) -> tuple:
    """``(x, sigma)``: the first state of :func:`.edits.sdedit` at ``strength`` of the schedule."""
    sigma = truncated_sigmas(denoiser, settings, strength)[0]
    return noise_source(source, item_noise(source, settings, START_NOISE), sigma), sigma


def bottleneck_function(denoiser: ShapesDenoiser, x: torch.Tensor, sigma, label) -> tuple:
    """``(f, h)``: the U-Net's eps as a function of its bottleneck at the state ``x`` (``x0 + sigma * eps``), and ``h``.

    ``label`` is the class the U-Net runs under. ``f`` keeps the encoder's skip connections and
    embedding fixed, as ComfyUI's output-block patch does.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(1).expand(x.shape[0])
    labels = torch.as_tensor(label).reshape(-1).expand(x.shape[0]).long()
    with torch.no_grad():
        h, skips, embedding = denoiser.unet.encode(x / (1 + sigma[:, None, None, None] ** 2).sqrt(),
                                                   denoiser.timestep(sigma), labels)
    return (lambda bottleneck: denoiser.unet.decode(bottleneck, skips, embedding)), h


class ShiftedBottleneck:
    """The U-Net with ``strength * direction`` added to its bottleneck at timesteps in ``[low, high]``.

    ``weight(t)``, if given, scales the shift per item by a function of its timestep.
    """

    def __init__(self, unet, direction: torch.Tensor, strength: float, low: float, high: float, weight=None):
        self.unet, self.direction, self.strength, self.low, self.high = unet, direction, strength, low, high
        self.weight = weight

    def shift(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        active = ((t >= self.low) & (t <= self.high)).to(h)
        if self.weight is not None:
            active = active * self.weight(t).to(h)
        return h + self.strength * active[:, None, None, None] * self.direction.to(h)

    def __call__(self, x, t, labels):
        return self.unet(x, t, labels, bottleneck=self.shift)


def shifted_denoiser(denoiser: ShapesDenoiser, direction: torch.Tensor, strength: float,
                     sigma_low: float = 0.0, sigma_high: float = float("inf"), weight=None) -> ShapesDenoiser:
    """``denoiser`` with its bottleneck shifted along ``direction`` (C, h, w) for sigmas in ``[sigma_low, sigma_high]``.

    ``weight(t)`` (:func:`strength_schedule`) scales the shift by the U-Net's timestep. A shallow
    copy: the schedule and the U-Net's weights are shared, and ``denoiser`` is left as it is.
    """
    if sigma_low > sigma_high:
        raise ValueError(f"sigma_low ({sigma_low}) must not exceed sigma_high ({sigma_high})")
    shifted = copy.copy(denoiser)
    bounds = denoiser.timestep(torch.tensor([max(sigma_low, 0.0), min(sigma_high, 1e30)]))
    shifted.unet = ShiftedBottleneck(denoiser.unet, direction, strength, float(bounds[0]), float(bounds[1]), weight)
    return shifted


SCHEDULE_LEVELS = ("sigma", "timestep")


def strength_schedule(denoiser: ShapesDenoiser, sigmas: torch.Tensor, level: str, power: float):
    """``weight(t)``: a shift's scale at the U-Net's timestep ``t``, ``c * (u / u_0) ** power`` of its level ``u``.

    ``u`` is the step's sigma or its timestep, ``u_0`` the first step's, over an edit's ``sigmas``
    (its steps' levels, then the last). ``c`` makes the steps' weights sum to what a constant
    shift's do, ``sum_i w_i (sigma_i - sigma_{i+1}) = sigma_0 - sigma_n``: an Euler step moves
    the image by its fall in sigma times eps, so to first order the edit's total shift is the
    constant one's. Power 0 is the constant shift; a positive power falls with the noise, and
    ``timestep`` at power 1 falls linearly to 0 at timestep 0 (the shapes schedule's last step).
    """
    if level not in SCHEDULE_LEVELS:
        raise ValueError(f"level must be one of {SCHEDULE_LEVELS}, got {level!r}")
    value_at = denoiser.timestep_to_sigma if level == "sigma" else (lambda t: t)
    levels = value_at(denoiser.timestep(sigmas[:-1]))
    if power < 0 and not (levels > 0).all():
        raise ValueError(f"power must not be negative when a step's {level} is 0, got {power}")
    first = levels[:1]
    falls = sigmas[:-1] - sigmas[1:]
    scale = falls.sum() / ((levels / first) ** power * falls).sum()

    def weight(t: torch.Tensor) -> torch.Tensor:
        return scale * (value_at(t) / first) ** power

    return weight


def trajectory_function(denoiser: ShapesDenoiser, source: torch.Tensor, label, settings: EditSettings,
                        strength: float, probe_steps) -> tuple:
    """``(g, 0)``: a shift of the bottleneck mapped to the first-order change of the edit's result, and no shift.

    ``g(delta) = sum_i w_i eps_i(h_i + delta)`` over the plain edit's states at ``probe_steps``
    (indices into its steps, the first 0), ``w_i`` the fall in sigma over the steps probe ``i``
    stands for, up to the next probe: an Euler step moves the image by its sigma's fall times
    eps. It leaves out how a step's change carries through the later steps.
    """
    sigmas = truncated_sigmas(denoiser, settings, strength)
    steps = sorted(set(int(step) for step in probe_steps))
    if not steps or steps[0] < 0 or steps[-1] >= len(sigmas) - 1:
        raise ValueError(f"probe_steps must be step indices from 0 to {len(sigmas) - 2}, got {list(probe_steps)}")
    states = []
    model = guided(denoiser, settings)
    labels = torch.as_tensor(label).reshape(-1)
    sample_euler(lambda x, sigma: model(x, sigma, labels), edit_start(denoiser, source, settings, strength)[0], sigmas,
                 callback=lambda step: states.append(step["x"]))
    ends = steps[1:] + [len(sigmas) - 1]
    probes = [(float(sigmas[step] - sigmas[end]), *bottleneck_function(denoiser, states[step], sigmas[step], label))
              for step, end in zip(steps, ends)]

    def g(delta):
        return sum(weight * f(h + delta) for weight, f, h in probes)

    return g, torch.zeros_like(probes[0][2])


def find_directions(denoiser: ShapesDenoiser, source: torch.Tensor, label, mask: torch.Tensor,
                    settings: EditSettings, strength: float, probe_steps=None, **search) -> RegionDirections:
    """Region directions for one source (1, 3, H, W) and its mask (1, 1, H, W).

    Found at the first state of its edit; or, with ``probe_steps``, for the change of the whole
    edit's result, from the states at those steps (:func:`trajectory_function`). ``search`` goes
    to :func:`ngdm_core.region_jacobian.region_directions` (k, confinement, ...).
    """
    if probe_steps is None:
        f, h = bottleneck_function(denoiser, *edit_start(denoiser, source, settings, strength), label)
    else:
        f, h = trajectory_function(denoiser, source, label, settings, strength, probe_steps)
    return region_directions(f, h, mask, **search)


def region_edit(denoiser: ShapesDenoiser, source: torch.Tensor, label, direction: torch.Tensor, shift: float,
                settings: EditSettings, strength: float) -> torch.Tensor:
    """The source re-noised to ``strength`` of the schedule and sampled under its own class, the bottleneck shifted
    by ``shift * direction`` at every step."""
    return sdedit(shifted_denoiser(denoiser, direction, shift), source, torch.as_tensor(label).reshape(-1),
                  settings, strength)


@dataclass
class ReprojectedEdit:
    """An edit whose direction was re-found at each step's state, and what re-finding it cost."""
    image: torch.Tensor
    directions: torch.Tensor  # (steps, *h.shape[1:]): the direction each step applied
    products: int  # JVP and VJP vectors of the re-found directions, beyond the search that gave the first


def reprojected_edit(denoiser: ShapesDenoiser, source: torch.Tensor, label, mask: torch.Tensor,
                     first: RatioDirections, shift: float, settings: EditSettings, strength: float, iterations: int,
                     ridge: float, weight=None) -> ReprojectedEdit:
    """:func:`region_edit` along ``first``'s top direction, re-found at every later step from the edit's own state.

    At step ``i > 0`` the ratio search (:func:`~ngdm_core.region_jacobian.refound_direction`:
    ``ridge``, at most ``iterations`` LOBPCG iterations, the node's ``tol``) runs at the bottleneck
    function of the edited state ``x_i``, warm-started from the previous step's block, and the
    direction it finds is signed to agree with the previous step's; ApplyRegionDirection's
    ``refind_iterations`` re-finds the same way. ``weight`` is :func:`shifted_denoiser`'s. With
    ``iterations`` 0 every step applies ``first``'s direction: the edit is :func:`region_edit`'s.
    """
    if iterations < 0:
        raise ValueError(f"iterations must not be negative, got {iterations}")
    sigmas = truncated_sigmas(denoiser, settings, strength)
    labels = torch.as_tensor(label).reshape(-1)
    x = edit_start(denoiser, source, settings, strength)[0]
    direction, block, products, applied = first.vectors[0], first.block, 0, []
    for step in range(len(sigmas) - 1):
        if step > 0 and iterations > 0:
            direction, found = refound_direction(Linearisation(*bottleneck_function(denoiser, x, sigmas[step], labels)),
                                                 mask, direction, block, ridge=ridge, iterations=iterations)
            products += found.jvp_vectors + found.vjp_vectors
            block = found.block
        applied.append(direction)
        model = guided(shifted_denoiser(denoiser, direction, shift, weight=weight), settings)
        x = sample_euler(lambda x, sigma: model(x, sigma, labels), x, sigmas[step:step + 2])
    return ReprojectedEdit(x, torch.stack(applied), products)


def edit_leakage(edited: torch.Tensor, unedited: torch.Tensor, mask: torch.Tensor,
                 margin: int = PRESERVE_MARGIN) -> tuple:
    """Per item, ``(leakage, change_inside)``: ``|change outside the dilated mask| / |change inside the mask|``, and
    the root-mean-square change per inside pixel value."""
    change = edited - unedited
    outside = (change * (1 - dilated(mask, margin))).flatten(1).norm(dim=1)
    inside = (change * mask).flatten(1).norm(dim=1)
    inside_values = (mask.expand_as(change)).flatten(1).sum(dim=1)
    return outside / inside, inside / inside_values.sqrt()
