"""What a ComfyUI user meets before a node runs: tooltips, the node search, help pages and queue-time checks."""

import asyncio
import os
import re

import pytest

PACK_NAME = "ngdm"
ACTION = "edit"
# What each node does, in the word a user would search for.
FUNCTION_WORDS = {
    "NGDMWeightMap": "mask", "PerPixelTimeSampler": "sampler", "PerPixelTimeModel": "model",
    "EditFriendlyInvert": "inversion", "EdgePreservingNoise": "noise", "EdgePreservingSampler": "sampler",
    "RegionJacobianDirection": "direction", "ApplyRegionDirection": "direction", "RectifierTrain": "train",
    "RectifierLoader": "load", "RectifierApply": "rectifier",
}
# The frontend (comfyui-frontend-package 1.35) searches nodes with Fuse.js over two keys only, the
# node id and the display name: no category, description or aliases. With its threshold 0.3 and
# Fuse's default location 0 and distance 100, an exact match counts only within the first 30
# characters of a key.
FUSE_REACH = 30


@pytest.fixture(scope="module")
def schemas(host):
    found = {node_id: cls.GET_SCHEMA() for node_id, cls in host.pack_nodes().items()}
    assert set(FUNCTION_WORDS) <= set(found)
    return found


def test_every_input_and_output_has_a_tooltip(schemas):
    missing = [f"{node_id}.{socket.id or socket.display_name or socket.io_type}"
               for node_id, schema in schemas.items() for socket in [*schema.inputs, *schema.outputs]
               if not (socket.tooltip or "").strip()]
    assert missing == []


def test_single_letter_widgets_say_what_they_are_first(schemas):
    letters = [(node_id, socket) for node_id, schema in schemas.items() for socket in schema.inputs
               if len(socket.id) == 1]
    assert {socket.id for _, socket in letters} >= {"a", "b", "k", "r"}
    for node_id, socket in letters:
        first_words = re.findall(r"[\w-]+", socket.tooltip)[:5]
        assert socket.id in first_words and len(first_words[0]) > 1, (node_id, socket.tooltip)


def test_every_node_is_found_by_the_pack_name_by_edit_and_by_what_it_does(schemas):
    def found(schema, word):
        return any(0 <= text.lower().find(word) <= FUSE_REACH for text in (schema.node_id, schema.display_name))

    for node_id, schema in schemas.items():
        words = [PACK_NAME, ACTION] + ([FUNCTION_WORDS[node_id]] if node_id in FUNCTION_WORDS else [])
        assert [word for word in words if not found(schema, word)] == [], schema.display_name


def help_page_url(python_module, node_id):
    """Where the frontend fetches a custom node's help: /extensions/<pack folder>/docs/<node id>.md."""
    parts = python_module.split(".")
    assert parts[0] == "custom_nodes"
    return f"/extensions/{parts[1].split('@')[0]}/docs/{node_id}.md"


def test_every_node_has_a_help_page_comfyui_serves(host, schemas):
    import server
    from aiohttp.test_utils import TestClient, TestServer

    async def fetch_all():
        had_instance = "instance" in vars(server.PromptServer)
        previous = getattr(server.PromptServer, "instance", None)
        prompt_server = server.PromptServer(asyncio.get_running_loop())
        try:
            prompt_server.add_routes()
            pages = {}
            async with TestClient(TestServer(prompt_server.app)) as client:
                for node_id in schemas:
                    info = (await (await client.get(f"/api/object_info/{node_id}")).json())[node_id]
                    response = await client.get(help_page_url(info["python_module"], node_id))
                    text = await response.text()
                    pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
                    statuses = [(await client.get(f"/extensions/{host.PACK_DIR_NAME}/docs/{picture}")).status
                                for picture in pictures]
                    pages[node_id] = (response.status, text, info["display_name"], statuses)
            return pages
        finally:
            # Nodes report training progress to a PromptServer.instance when there is one.
            if had_instance:
                server.PromptServer.instance = previous
            else:
                del server.PromptServer.instance

    for node_id, (status, text, display_name, picture_statuses) in asyncio.run(fetch_all()).items():
        assert status == 200, node_id
        assert text.splitlines()[0] == f"# {display_name}"
        assert all(picture == 200 for picture in picture_statuses), node_id
    assert os.path.isfile(os.path.join(host.PACK_ROOT, "web", "docs", "shapes_demo.png"))


def validation_errors(prompt):
    """The queue-time errors of each node, as ComfyUI's validate_prompt reports them (outputs left out on error)."""
    import execution
    _, _, _, node_errors = asyncio.run(execution.validate_prompt("validate", prompt, None))
    return {node: [error["details"] for error in errors["errors"]] for node, errors in node_errors.items()}


@pytest.mark.parametrize("workflow, node_id, low, high", [
    ("region_direction_edit", "ApplyRegionDirection", "start_percent", "end_percent"),
    ("edge_preserving_stroke_img2img", "EdgePreservingNoise", "lambda_min", "lambda_max"),
    ("edge_preserving_stroke_img2img", "EdgePreservingSampler", "lambda_min", "lambda_max"),
])
def test_a_wrong_widget_combination_is_refused_when_queued(host, workflow, node_id, low, high):
    prompt = host.load_workflow(workflow, 2)
    assert validation_errors(prompt) == {}
    key = next(key for key, node in prompt.items() if node["class_type"] == node_id)
    widgets = prompt[key]["inputs"]
    widgets[low], widgets[high] = 0.8, 0.2
    assert f"{low} - {low} (0.8) must not exceed {high} (0.2)" in validation_errors(prompt).get(key, [])
    # Naming a widget in validate_inputs switches ComfyUI's own range check off; the node redoes it.
    widgets[low], widgets[high] = 0.2, 20.0
    assert any(f"{high} must be at most" in error for error in validation_errors(prompt).get(key, []))


def test_a_linked_value_is_left_to_the_node_when_it_runs(host):
    import nodes
    apply = nodes.NODE_CLASS_MAPPINGS["ApplyRegionDirection"]
    assert apply.validate_inputs(start_percent=None, end_percent=0.1) is True
    assert apply.validate_inputs(start_percent=0.5, end_percent=0.5) is True
