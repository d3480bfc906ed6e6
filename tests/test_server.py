"""The pack inside a real ComfyUI server: schema over HTTP, validation of bad values, a real execution."""

import os

import pytest
import safetensors.torch

from devtools import tiny_models as tm
from devtools.comfy_server import ComfyServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("comfy"))
    models = os.path.join(workdir, "models")
    os.makedirs(os.path.join(models, "diffusion_models"))
    for kind in ("sd3", "sd35_medium"):
        state = tm.build(kind).patcher.model.diffusion_model.state_dict()
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                                    os.path.join(models, "diffusion_models", f"tiny_{kind}.safetensors"))
    config = os.path.join(workdir, "extra_model_paths.yaml")
    with open(config, "w") as f:
        f.write(f"tiny:\n    base_path: {models}\n    diffusion_models: diffusion_models\n")
    srv = ComfyServer(workdir, ("--extra-model-paths-config", config)).start()
    yield srv
    srv.stop()


def graph(unet_name, gamma=1.2, threshold=0.97, mode="exact"):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "TACAPatchModel",
              "inputs": {"model": ["1", 0], "gamma": gamma, "threshold_sigma": threshold, "mode": mode}},
        "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "diffusion_models/taca"}},
    }


def test_object_info_lists_the_node_with_its_inputs(server):
    info = server.get("/object_info/TACAPatchModel")["TACAPatchModel"]
    assert info["display_name"] == "TACA Patch Model"
    assert info["input_order"]["required"] == ["model", "gamma", "threshold_sigma", "mode"]
    assert "comfyui-taca" in info["python_module"]
    assert "No module named" not in server.log() or "comfyui-taca" not in server.log().split("No module named")[1][:200]


@pytest.mark.parametrize("field,value", [("gamma", -1.0), ("gamma", 0.0), ("gamma", 99.0),
                                         ("threshold", 1.5), ("threshold", -0.1)])
def test_out_of_range_values_are_refused_by_validation(server, field, value):
    kwargs = {field: value}
    status, body = server.post("/prompt", {"prompt": graph("tiny_sd3.safetensors", **kwargs)})
    assert status == 400, body
    errors = body["node_errors"]["2"]["errors"]
    input_name = {"threshold": "threshold_sigma"}.get(field, field)
    assert any(e["extra_info"]["input_name"] == input_name for e in errors), errors
    assert "1" not in body["node_errors"]  # nothing else in the graph is blamed


def test_unknown_mode_fails_the_node_with_a_clear_message(server):
    # ComfyUI 0.3.75 does not check V3 combo values at validation; the node itself refuses.
    status, body = server.post("/prompt", {"prompt": graph("tiny_sd3.safetensors", mode="turbo")})
    if status == 400:  # a ComfyUI that validates combos refuses it earlier: also fine
        assert "2" in body["node_errors"]
        return
    result = server.wait_for(body["prompt_id"])
    assert result["status"]["status_str"] == "error"
    errors = [m[1] for m in result["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_id"] == "2"
    assert "mode" in errors[0]["exception_message"] and "exact" in errors[0]["exception_message"]


@pytest.mark.parametrize("unet", ["tiny_sd3.safetensors", "tiny_sd35_medium.safetensors"])
def test_the_node_executes_on_a_model_loaded_by_comfyui(server, unet):
    status, body = server.post("/prompt", {"prompt": graph(unet)})
    assert status == 200, body
    result = server.wait_for(body["prompt_id"])
    assert result["status"]["status_str"] == "success", result["status"]
