"""Models already in memory (`camloc.wrap_model`, and every API function taking the object itself): the maps
equal those of the same weights loaded by name, the caller's object is never changed, and a run records the
object's class and state_dict SHA-256 (issue 31)."""
import json

import numpy as np
import pytest
import torch

import camloc
from camloc.errors import ModelError

METHODS = ["gradcam", "layercam", "sclip"]


def _same_maps(a, b, methods=METHODS):
    for m in methods:
        np.testing.assert_allclose(a.maps[m], b.maps[m], rtol=0, atol=1e-6, err_msg=m)


def test_an_open_clip_model_object_explains_and_evaluates_as_its_file_does(tmp_path):
    pytest.importorskip("open_clip")
    from camloc.models import open_clip_backend

    obj, _, _, _, _ = open_clip_backend.load("open_clip:camloc-tiny-vit:random@3")  # any open_clip model object
    assert type(obj).__module__.startswith("open_clip")
    before = {k: v.clone() for k, v in obj.state_dict().items()}
    path = tmp_path / "tiny.pt"
    torch.save(obj.state_dict(), path)
    by_name = camloc.load_model(f"open_clip:camloc-tiny-vit:{path}", device="cpu")
    image = "tests/golden/chelsea_small.png"
    _same_maps(camloc.explain(obj, image, ["a cat", "a dog"], METHODS),
               camloc.explain(by_name, image, ["a cat", "a dog"], METHODS))
    wrapped = camloc.wrap_model(obj, device="cpu")
    assert wrapped.name.startswith("in-memory:CLIP-") and wrapped.backend.info["class"] == "open_clip.model.CLIP"
    summary = camloc.evaluate(obj, "demo", ["gradcam"], out=tmp_path / "run", device="cpu", limit=2)
    named = camloc.evaluate(by_name, "demo", ["gradcam"], out=tmp_path / "named", limit=2)
    assert summary["methods"]["gradcam"]["mean_iou"] == named["methods"]["gradcam"]["mean_iou"]
    weights = json.loads((tmp_path / "run" / "config.json").read_text())["weights"]
    assert weights["class"] == "open_clip.model.CLIP" and weights["sha256"] == wrapped.backend.info["sha256"]
    assert all(torch.equal(before[k], v) for k, v in obj.state_dict().items())  # the caller's model untouched
    # other weights: another name, so never the same run
    torch.nn.init.normal_(obj.visual.proj)
    assert camloc.wrap_model(obj, device="cpu").name != wrapped.name


def test_a_clip_package_model_object_equals_the_named_model(tmp_path):
    from camloc.models.loading import build_from_state_dict, random_state_dict
    from camloc.models.specs import ALL_SPECS

    obj = build_from_state_dict(random_state_dict(ALL_SPECS["tiny-vit"]), "tiny-vit")
    image = "tests/golden/chelsea_small.png"
    _same_maps(camloc.explain(obj, image, ["a cat", "a dog"], METHODS),
               camloc.explain("tiny-vit", image, ["a cat", "a dog"], METHODS))
    model = camloc.wrap_model(obj, device="cpu")
    assert model.backend.info["class"] == "clip.model.CLIP" and model.family.name == "vit"
    ours = camloc.evaluate(obj, "demo", ["gradcam", "sclip"], out=tmp_path / "obj", device="cpu")
    named = camloc.evaluate("tiny-vit", "demo", ["gradcam", "sclip"], out=tmp_path / "named", device="cpu")
    for method in ("gradcam", "sclip"):  # every value but the wall time
        ours["methods"][method].pop("pairs_per_second"), named["methods"][method].pop("pairs_per_second")
        assert ours["methods"][method] == named["methods"][method]


def test_a_transformers_clip_model_object_equals_its_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=1, num_hidden_layers=1,
                         vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=1, num_hidden_layers=2,
                           image_size=64, patch_size=16, hidden_act="quick_gelu"), projection_dim=64)
    torch.manual_seed(0)
    obj = transformers.CLIPModel(config).eval()
    obj.save_pretrained(tmp_path / "hf")
    image = "tests/golden/chelsea_small.png"
    _same_maps(camloc.explain(obj, image, ["a cat"], METHODS), camloc.explain(str(tmp_path / "hf"), image, ["a cat"],
                                                                              METHODS))
    assert camloc.wrap_model(obj, device="cpu").backend.info["class"].endswith("CLIPModel")
    ours = camloc.evaluate(obj, "demo", ["gradcam"], out=tmp_path / "obj", device="cpu", limit=3)
    folder = camloc.evaluate(str(tmp_path / "hf"), "demo", ["gradcam"], out=tmp_path / "folder", device="cpu", limit=3)
    assert ours["methods"]["gradcam"]["mean_iou"] == folder["methods"]["gradcam"]["mean_iou"]


def test_objects_camloc_cannot_read_are_one_clear_error():
    with pytest.raises(ModelError, match="has no visual, encode_image, encode_text, logit_scale"):
        camloc.wrap_model(torch.nn.Linear(2, 2))
    with pytest.raises(ModelError, match="must be a name, a path, a camloc ClipModel or a CLIP model object"):
        camloc.explain(42, "tests/golden/chelsea_small.png", "cat")
    pytest.importorskip("open_clip")
    from camloc.models import open_clip_backend

    obj, *_ = open_clip_backend.load("open_clip:camloc-tiny-vit:random")
    with pytest.raises(ModelError, match="give both mean and std"):
        camloc.wrap_model(obj, mean=(0.5, 0.5, 0.5))
    mapvit, *_ = open_clip_backend.load("open_clip:camloc-tiny-mapvit:random")
    if type(mapvit).__name__ != "CLIP":  # a CustomTextCLIP: its tokenizer must be given
        with pytest.raises(ModelError, match="pass tokenizer="):
            camloc.wrap_model(mapvit)
