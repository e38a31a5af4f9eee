"""ngdm_core and the same edit as a ComfyUI graph agree on the shapes model (the full 20 sources:
``benchmarks/comfy_agreement.py``)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes_agreement  # noqa: E402
import shapes_templates  # noqa: E402


@pytest.fixture(scope="module")
def rows(host):
    shapes_templates.register_capture()
    return shapes_agreement.agreement(host, [0, 1])


@pytest.mark.parametrize("method", shapes_agreement.METHODS)
def test_comfyui_computes_what_the_core_computes_with_comfyuis_timestep(rows, method):
    tolerance = shapes_agreement.FLOAT_TOLERANCE
    for row in (row for row in rows if row["method"] == method):
        # With ComfyUI's timestep rule the core runs the same maths: float reordering only.
        assert row["edit_vs_rule"] <= tolerance, row
        assert row.get("map_vs_rule", 0.0) <= tolerance, row
        # The core's own run differs from ComfyUI's by no more than the timestep rule moves it.
        assert row["edit_vs_core"] <= row["core_vs_rule"] + tolerance, row
        assert row.get("map_vs_core", 0.0) <= row.get("map_core_vs_rule", 0.0) + tolerance, row
