"""Every example workflow in ComfyUI's real frontend (check_templates.py), as a test of the ComfyUI at COMFYUI_PATH.

It runs that ComfyUI with this test's Python, so it needs Playwright in the same venv and Debian's chromium;
without either, or without COMFYUI_PATH, it skips. About 20 s per ComfyUI on 2 cores.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_templates  # noqa: E402

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


@pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the frontend check needs a ComfyUI checkout")
@pytest.mark.skipif(not os.path.exists(check_templates.CHROMIUM),
                    reason=f"no {check_templates.CHROMIUM}: install Debian's chromium (apt-get install chromium)")
def test_every_template_loads_whole_with_its_values_and_no_node_covers_another():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        _, results = check_templates.check_comfyui(playwright, os.path.abspath(COMFYUI_PATH), sys.executable,
                                                   check_templates.DEFAULT_FOLDER, check_templates.template_names(),
                                                   None, False)
    assert results and not {name: problems for name, (problems, _) in results.items() if problems}


# A node's /object_info entry: a seed with its control value, a widget appended later as an optional input.
SPEC = {"input": {"required": {"latent": ["LATENT", {}],
                               "seed": ["INT", {"default": 0, "min": 0, "max": 99, "control_after_generate": True}],
                               "steps": ["INT", {"default": 10, "min": 1, "max": 64}],
                               "mode": [["soft", "hard"], {}]},
                  "optional": {"threshold": ["FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0}]}},
        "input_order": {"required": ["latent", "seed", "steps", "mode"], "optional": ["threshold"]}}


def test_saved_values_map_through_the_schema_and_a_widget_appended_since_takes_its_default():
    node = {"widgets_values": [7, "fixed", 12, "hard"], "inputs": [{"name": "latent", "link": 1}]}
    queued = {"latent": ["3", 0], "seed": 7, "steps": 12, "mode": "hard", "threshold": 0.2}
    assert check_templates.widget_problems(node, SPEC, queued) == ([], False)
    problems, _ = check_templates.widget_problems(node, SPEC, {**queued, "threshold": 0.5})
    assert problems == ["threshold queued as 0.5, but the default (not saved) is 0.2"]


def test_values_shifted_by_a_missing_entry_are_caught_even_where_the_frontend_shifts_them_alike():
    node = {"widgets_values": [7, 12, "hard"], "inputs": []}
    queued = {"seed": 7, "steps": "hard", "mode": None, "threshold": 0.2}
    problems, _ = check_templates.widget_problems(node, SPEC, queued)
    assert "widgets_values[1] = 12 is not a control after generate of seed: are the values shifted?" in problems
    assert "widgets_values[2] = 'hard' is not a valid INT of steps: are the values shifted?" in problems
