"""Pure-PyTorch maths of the pack's editing methods; never imports ComfyUI.

The names below load their module on first use, so importing the package alone does not load
torch: ``python -m ngdm_core.demo`` checks its arguments before torch loads.
"""

import importlib

_MODULE_OF = {
    "GaussianDenoiser": "denoisers", "classifier_free_guidance": "denoisers",
    "per_pixel_time_denoiser": "ngdm", "power_law_start_sigmas": "ngdm", "sample_per_pixel_time": "ngdm",
    "start_sigmas": "ngdm", "started": "ngdm", "weight_map": "ngdm", "change_weight_map": "change_map",
    "masked_denoiser": "masked", "sample_masked": "masked",
    "SAMPLERS": "samplers", "sample_dpmpp_2m": "samplers", "sample_euler": "samplers",
    "sample_euler_ancestral": "samplers",
    "noise_source": "schedule",
}

__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


def __dir__():
    return sorted([*globals(), *__all__])
