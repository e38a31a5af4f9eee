"""ComfyUI entry point of the pack: V3 nodes registered through ``comfy_entrypoint``."""


async def comfy_entrypoint():
    # Imported on call, so the package imports without ComfyUI (test runners import this file).
    from .nodes import EditingExtension
    return EditingExtension()
