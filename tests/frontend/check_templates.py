"""Open every example workflow in ComfyUI's real frontend and check what a user sees.

For each ComfyUI given (its source folder and the Python of its venv), this starts the server on a free
loopback port with the pack linked into a temporary ``custom_nodes/``, opens the frontend in Debian's
chromium (``apt-get install chromium``; Playwright from pip drives it, never a downloaded browser), loads
every ``example_workflows/*.json`` as the template menu does, and checks:

- no node is missing or deprecated (the frontend knows every node type; the server marks none deprecated);
- every widget value is where it belongs: the prompt the frontend builds (``graphToPrompt``) holds, for
  each widget, the JSON's ``widgets_values`` entry that the node's schema maps to it, or the widget's
  default where a workflow saved before the widget existed has no entry; each saved value fits its widget
  (type, range, options; a seed's control value), so values shifted by a missing entry show;
- every saved link arrives at the input it names;
- no node's box, title bar included, overlaps another's, at the size the frontend draws it.

Run it with any Python that has Playwright (it runs ComfyUI with the Python you name):

    python tests/frontend/check_templates.py \\
        --comfyui ../shared/comfyui/src /tmp/venvs/c08/bin/python \\
        --comfyui ../shared/comfyui-0.33/src /tmp/venvs/c33/bin/python --screenshots /tmp/shots

It prints one line per template and ComfyUI, and exits 1 if any check fails. ``--thumbnails`` redraws
``example_workflows/<name>.jpg`` (800x500) from the first ComfyUI's frontend.
"""

import argparse
import contextlib
import glob
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_DIR_NAME = "ngdm-image-editing"
DEFAULT_FOLDER = os.path.join(PACK_ROOT, "example_workflows")
CHROMIUM = "/usr/bin/chromium"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SERVER_START_S = 300
SCREENSHOT_VIEWPORT = {"width": 2400, "height": 1500}
# Thumbnails (as the template browser shows them) are a 1600x1000 view drawn at half scale.
THUMBNAIL_VIEWPORT = {"width": 1600, "height": 1000}
# First-visit dialogs and the minimap would cover the graph; zoomed out to fit a template, the frontend would
# draw nodes without their text (level of detail), which the old thumbnails show.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}

# Read in the page after a workflow loads: the prompt the frontend would queue and every node's box.
READ_GRAPH_JS = """async () => {
  const app = window.app, LG = window.LiteGraph;
  const prompt = await app.graphToPrompt();
  const title = LG.NODE_TITLE_HEIGHT;
  const nodes = app.graph._nodes.map(n => {
    const min = n.computeSize();
    return {id: n.id, type: n.type, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
            min: [min[0], min[1]], title: n.collapsed ? 0 : title, collapsed: !!n.collapsed,
            registered: !!LG.registered_node_types[n.type]};
  });
  return {output: prompt.output, nodes};
}"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@contextlib.contextmanager
def comfyui_server(source, python, log_path):
    """A ComfyUI server on a free loopback port with this pack installed; yields its base URL."""
    base = tempfile.mkdtemp(prefix="ngdm_frontend_")
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(PACK_ROOT, os.path.join(base, "custom_nodes", PACK_DIR_NAME))
    port = free_port()
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
               "--database-url", f"sqlite:///{base}/comfyui.db", "--disable-api-nodes"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=source, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {server.returncode} before serving; see {log_path}")
            try:
                get_json(f"{url}/api/system_stats")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not serve within {SERVER_START_S} s; see {log_path}")
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def widget_slots(spec):
    """The widgets of a node's inputs in saved order, from its /object_info entry.

    Returns ``(name, input_spec, extra)`` per widget, where ``extra`` counts the values the frontend saves after
    it (a seed's control_after_generate, an image upload's button); ``None`` if a dynamic input makes the order
    unknowable here.
    """
    order = spec.get("input_order") or {section: list(spec["input"].get(section, {}))
                                        for section in ("required", "optional")}
    slots = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            input_spec = spec["input"][section][name]
            kind = input_spec[0]
            options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
            if isinstance(kind, str) and kind.startswith("COMFY_") and kind != "COMFY_AUTOGROW_V3":
                return None
            if kind == "COMFY_AUTOGROW_V3" or options.get("forceInput"):
                continue
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                extra = int(is_controlled(name, input_spec)) + int(bool(options.get("image_upload")))
                slots.append((name, input_spec, extra))
    return slots


def is_controlled(name, input_spec):
    """Whether the frontend gives this widget a control_after_generate widget (seeds do by name)."""
    options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
    return bool(options.get("control_after_generate", input_spec[0] == "INT" and name in ("seed", "noise_seed")))


def default_of(input_spec):
    kind = input_spec[0]
    options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else None
    if kind == "COMBO":
        return (options.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def same_value(saved, shown):
    if isinstance(saved, bool) or isinstance(shown, bool):
        return saved is shown or saved == shown
    if isinstance(saved, (int, float)) and isinstance(shown, (int, float)):
        return math.isclose(saved, shown, rel_tol=1e-9, abs_tol=1e-12)
    return saved == shown


USER_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".png", ".jpg", ".jpeg", ".webp")


def invalid(value, input_spec):
    """Why ``value`` cannot be this widget's (wrong type, out of range, not an option), or ``None``."""
    kind = input_spec[0]
    options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
    choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
    if choices is not None:
        # A file the user supplies (a model, an input image) is listed only where it is installed: this server
        # has none, so its list is empty or holds only built-in entries (VAELoader's "pixel_space").
        user_file = isinstance(value, str) and value.lower().endswith(USER_FILE_SUFFIXES)
        return None if not choices or user_file or value in choices else f"not one of its {len(choices)} options"
    types = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    if not isinstance(value, types) or (kind != "BOOLEAN" and isinstance(value, bool)):
        return f"not a valid {kind}"
    if kind in ("INT", "FLOAT") and not options.get("min", -math.inf) <= value <= options.get("max", math.inf):
        return f"outside {options.get('min')}..{options.get('max')}"
    return None


def widget_problems(node, spec, queued):
    """Where the values the frontend would queue for ``node`` differ from its saved ``widgets_values``."""
    slots = widget_slots(spec)
    values = node.get("widgets_values") or []
    if slots is None or isinstance(values, dict):  # dynamic inputs, or values saved by name (some packs' nodes)
        return [], True
    linked = {slot.get("widget", {}).get("name") for slot in node.get("inputs", []) if slot.get("link") is not None}
    controlled = {name for name, input_spec, _ in slots if is_controlled(name, input_spec)}
    problems = []
    index = 0
    for name, input_spec, extra in slots:
        shown = queued.get(name)
        if index < len(values):
            expected, origin = values[index], f"widgets_values[{index}]"
        else:
            expected, origin = default_of(input_spec), "the default (not saved)"
        why = invalid(expected, input_spec) if index < len(values) else None
        if why:
            problems.append(f"{origin} = {expected!r} is {why} of {name}: are the values shifted?")
        if extra and index + 1 < len(values) and name in controlled and values[index + 1] not in CONTROL_VALUES:
            problems.append(f"widgets_values[{index + 1}] = {values[index + 1]!r} is not a control after generate "
                            f"of {name}: are the values shifted?")
        index += 1 + extra
        if name in linked:
            if not isinstance(shown, list):
                problems.append(f"{name} is linked in the JSON but queued as the value {shown!r}")
            continue
        if not same_value(expected, shown):
            problems.append(f"{name} queued as {shown!r}, but {origin} is {expected!r}")
    if len(values) > index:
        problems.append(f"widgets_values holds {len(values)} values; the schema places {index}")
    return problems, False


def link_problems(node, links, object_info, queued):
    """Inputs whose saved link from a node that is queued (not a frontend-only one) is not in the queued prompt."""
    problems = []
    for slot in node.get("inputs", []):
        link = links.get(slot.get("link"))
        if link is None or link[1] not in object_info:
            continue
        if queued.get(slot["name"]) != [link[0], link[2]]:
            problems.append(f"input {slot['name']} queued as {queued.get(slot['name'])!r}, but it is linked to "
                            f"#{link[0]} output {link[2]}")
    return problems


def box(node):
    """The node's rectangle (x, y, w, h) as drawn: its title bar and at least the size its widgets need."""
    x, y = node["pos"]
    width = max(node["size"][0], node["min"][0])
    height = node["title"] if node["collapsed"] else max(node["size"][1], node["min"][1])
    return x, y - node["title"], width, height + node["title"]


def overlaps(nodes):
    found = []
    boxes = [(node, box(node)) for node in nodes]
    for i, (a, (ax, ay, aw, ah)) in enumerate(boxes):
        for b, (bx, by, bw, bh) in boxes[i + 1:]:
            width = min(ax + aw, bx + bw) - max(ax, bx)
            height = min(ay + ah, by + bh) - max(ay, by)
            if width > 0 and height > 0:
                found.append(f"#{a['id']} {a['type']} and #{b['id']} {b['type']} overlap by {width:.0f}x{height:.0f}")
    return found


def check_template(page, name, workflow, object_info):
    """Load ``workflow`` as the template ``name``; returns its problems, notes and each node's drawn box."""
    page.evaluate("async ([w, n]) => { await window.app.loadGraphData(w, true, true, n); }", [workflow, name])
    page.wait_for_timeout(300)
    graph = page.evaluate(READ_GRAPH_JS)
    problems, notes = [], []
    # Node ids as strings: the prompt's keys, and the graph's own ids in newer frontends.
    saved = {str(node["id"]): node for node in workflow["nodes"]}
    # link id -> (origin node id, origin type, origin slot)
    origins = {link[0]: (str(link[1]), saved[str(link[1])]["type"], link[2]) for link in workflow["links"]}
    loaded = {str(node["id"]): node for node in graph["nodes"]}
    if set(saved) != set(loaded):
        problems.append(f"nodes in the JSON {sorted(saved)} but in the graph {sorted(loaded)}")
    for node_id, node in saved.items():
        kind = node["type"]
        shown = loaded.get(node_id)
        if shown is None or not shown["registered"]:
            problems.append(f"#{node_id} {kind} is missing")
            continue
        spec = object_info.get(kind)
        if spec is None:  # a frontend-only node (Note, Reroute): nothing is queued
            continue
        if spec.get("deprecated"):
            problems.append(f"#{node_id} {kind} is deprecated")
        queued = graph["output"].get(node_id, {}).get("inputs", {})
        found, unchecked = widget_problems(node, spec, queued)
        found += link_problems(node, origins, object_info, queued)
        problems += [f"#{node_id} {kind}: {problem}" for problem in found]
        if unchecked:
            notes.append(f"#{node_id} {kind}: widgets not checked (dynamic inputs, or values saved by name)")
    problems += overlaps(graph["nodes"])
    return problems, notes, {node["id"]: [node["type"], *box(node)] for node in graph["nodes"]}


def fit_view(page):
    page.evaluate("""() => {
      const canvas = window.app.canvas;
      const nodes = window.app.graph._nodes;
      let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
      for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
      }
      // Clear of the side bar on the left and the tabs and run bar at the top.
      const ds = canvas.ds, left = 90, top = 120, margin = 30;
      const {width: w, height: h} = canvas.canvas.getBoundingClientRect();  // CSS pixels, whatever the scale
      ds.scale = Math.min((w - left - margin) / (x1 - x0), (h - top - margin) / (y1 - y0));
      ds.offset[0] = left / ds.scale - x0; ds.offset[1] = top / ds.scale - y0;
      canvas.setDirty(true, true); canvas.draw(true, true);
    }""")
    page.wait_for_timeout(300)


def check_comfyui(playwright, source, python, folder, names, screenshots, thumbnails):
    """Check every template in one ComfyUI; returns {name: (problems, notes)} and the frontend's version."""
    log_path = os.path.join(tempfile.gettempdir(), f"ngdm_frontend_{os.getpid()}_{free_port()}.log")
    results, boxes = {}, {}
    with comfyui_server(source, python, log_path) as url:
        object_info = get_json(f"{url}/api/object_info")
        served = get_json(f"{url}/api/workflow_templates").get(PACK_DIR_NAME, [])
        request = urllib.request.Request(f"{url}/api/settings", method="POST", data=json.dumps(SETTINGS).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            if thumbnails:
                page = browser.new_page(viewport=THUMBNAIL_VIEWPORT, device_scale_factor=0.5)
            else:
                page = browser.new_page(viewport=SCREENSHOT_VIEWPORT)
            page.goto(url)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                                   " && window.LiteGraph.registered_node_types['KSampler']", timeout=120_000)
            version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")
            for name in names:
                with open(os.path.join(folder, f"{name}.json")) as f:
                    workflow = json.load(f)
                problems, notes, boxes[name] = check_template(page, name, workflow, object_info)
                if folder == DEFAULT_FOLDER and name not in served:
                    problems.append("not served as a template (/api/workflow_templates)")
                results[name] = (problems, notes)
                if screenshots or thumbnails:
                    fit_view(page)
                if screenshots:
                    os.makedirs(os.path.join(screenshots, f"frontend-{version}"), exist_ok=True)
                    page.screenshot(path=os.path.join(screenshots, f"frontend-{version}", f"{name}.png"))
                if thumbnails:
                    page.screenshot(path=os.path.join(folder, f"{name}.jpg"), type="jpeg",
                                    quality=85)
        finally:
            browser.close()
    if screenshots:
        with open(os.path.join(screenshots, f"frontend-{version}", "boxes.json"), "w") as f:
            json.dump(boxes, f, indent=1)
    return version, results


def template_names(folder=DEFAULT_FOLDER):
    return sorted(os.path.splitext(os.path.basename(path))[0] for path in glob.glob(os.path.join(folder, "*.json")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", nargs=2, action="append", required=True, metavar=("SOURCE", "PYTHON"),
                        help="a ComfyUI source folder and the Python of its venv; repeat for several")
    parser.add_argument("--screenshots", help="folder for a screenshot of every template per frontend, and "
                                              "boxes.json: each node's box (type, x, y, width, height) as drawn")
    parser.add_argument("--thumbnails", action="store_true",
                        help="redraw example_workflows/<name>.jpg from the first ComfyUI's frontend")
    parser.add_argument("--only", nargs="*", help="template names to check (default: all)")
    parser.add_argument("--workflows", default=DEFAULT_FOLDER,
                        help="folder of UI-format workflows to check (default: the pack's example_workflows)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    names = args.only or template_names(args.workflows)
    failed = False
    with sync_playwright() as playwright:
        for index, (source, python) in enumerate(args.comfyui):
            start = time.monotonic()
            version, results = check_comfyui(playwright, os.path.abspath(source), python, args.workflows, names,
                                             args.screenshots, args.thumbnails and index == 0)
            for name, (problems, notes) in results.items():
                failed |= bool(problems)
                print(f"frontend {version} {name}: {'FAIL' if problems else 'ok'}")
                for line in problems:
                    print(f"    {line}")
                for line in notes:
                    print(f"    note: {line}")
            print(f"frontend {version} ({source}): {len(results)} templates in {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
