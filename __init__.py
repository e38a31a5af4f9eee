"""ComfyUI entry point of the pack: V3 nodes registered through ``comfy_entrypoint``."""


async def comfy_entrypoint():
    # Imported on call, so the package imports without ComfyUI (test runners import this file).
    from .nodes import EditingExtension
    return EditingExtension()


# ComfyUI serves this folder at /extensions/<pack folder>/; its docs/<NodeId>.md are the nodes' help pages.
WEB_DIRECTORY = "./web"
