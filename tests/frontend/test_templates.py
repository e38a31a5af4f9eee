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
