import os
import sys

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SKIP_REASON = "COMFYUI_PATH is not set: the real-host tests need a ComfyUI checkout (see README, Testing)"


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def host():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny_host
    return tiny_host.start(os.path.abspath(COMFYUI_PATH))
