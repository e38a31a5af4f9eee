NODE_IDS = ("NGDMWeightMap", "PerPixelTimeSampler", "PerPixelTimeModel", "EditFriendlyInvert",
            "EdgePreservingNoise", "EdgePreservingSampler",
            "RegionJacobianDirection", "ApplyRegionDirection",
            "RectifierTrain", "RectifierLoader", "RectifierApply",
            "NGDMShapesModelLoader", "NGDMShapesClass", "NGDMShapesSource")


def test_comfyui_loads_the_pack_and_registers_its_nodes(host):
    import nodes
    assert host.PACK_DIR_NAME in nodes.LOADED_MODULE_DIRS
    for node_id in NODE_IDS:
        assert node_id in nodes.NODE_CLASS_MAPPINGS
    assert not [w for w in host.LOAD_WARNINGS if host.PACK_DIR_NAME in w or "ngdm" in w.lower()]


def test_the_example_workflows_are_served_as_templates(host):
    import os
    folder = os.path.join(host.PACK_ROOT, "example_workflows")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
    assert names == ["edge_preserving_stroke_img2img.json", "edit_friendly_edit.json", "flux_kontext_confined_edit.json",
                     "flux_ngdm_edit_friendly_edit.json", "ngdm_controlnet_edit.json", "ngdm_edit_friendly_edit.json",
                     "ngdm_ksampler_edit.json", "ngdm_text_edit.json", "qwen_image_edit_confined_edit.json",
                     "rectifier_edit_training.json", "rectifier_reconstruct_edit.json", "region_direction_edit.json",
                     "shapes_edge_preserving_img2img.json", "shapes_edit_friendly_edit.json",
                     "shapes_masked_sampling_comparison.json", "shapes_ngdm_edit.json",
                     "shapes_ngdm_edit_friendly_edit.json", "shapes_rectifier_reconstruct.json",
                     "shapes_region_direction_edit.json"]
