"""Small k-diffusion-style samplers over ``(model, x, sigmas)``, for using the pack without ComfyUI.

``model(x, sigma_batch, **extra_args)`` returns the denoised ``x0``; ``sigma_batch`` holds one
sigma per batch item. ``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` at
every step, as in ComfyUI. Inside ComfyUI the host's own samplers are used instead.
"""

import torch


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def _step_to(x, sigma, sigma_next, denoised):
    # The last step to sigma = 0 lands on the prediction itself; writing it as x + d * dt would
    # add and cancel sigma * noise and leave float error where the prediction is exact.
    if sigma_next == 0:
        return denoised
    return x + _to_d(x, sigma, denoised) * (sigma_next - sigma)


def report_step(callback, x, i, sigma, denoised):
    """Call a ComfyUI-style step callback, if any."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None):
    """Deterministic Euler (DDIM for a VP model, the flow ODE step for a flow model)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, x, i, sigmas[i], denoised)
        x = _step_to(x, sigmas[i], sigmas[i + 1], denoised)
    return x


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """k-diffusion's split of a VP step into a deterministic part to ``sigma_down`` and fresh noise ``sigma_up``."""
    if not eta:
        return sigma_to, 0.0 * sigma_to
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, generator=None):
    """Ancestral Euler for VP models: every step adds fresh noise of scale ``sigma_up``."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, x, i, sigmas[i], denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = _step_to(x, sigmas[i], sigma_down, denoised)
        if sigmas[i + 1] > 0:
            x = x + torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None):
    """DPM-Solver++(2M): a deterministic multistep sampler, to show history does not break the replacement."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            break
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None:
            denoised_d = denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


SAMPLERS = {"euler": sample_euler, "euler_ancestral": sample_euler_ancestral, "dpmpp_2m": sample_dpmpp_2m}
