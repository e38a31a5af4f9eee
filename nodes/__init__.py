"""ComfyUI adapters: one module per method; the maths lives in ``ngdm_core``."""

from comfy_api.latest import ComfyExtension, io

from . import edge_preserving, edit_friendly, ngdm, rectifier, region_jacobian, shapes


class EditingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*ngdm.NODES, *edit_friendly.NODES, *edge_preserving.NODES, *region_jacobian.NODES,
                *rectifier.NODES, *shapes.NODES]
