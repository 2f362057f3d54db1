"""Writes the lxt fixtures of tests/test_attnlrp.py: CP-LRP relevance computed by lxt's own patches (PyPI `lxt` 2.1,
`lxt.efficient.monkey_patch` with its torchvision-ViT rule set `vit_torch.cp_LRP`, which patches torch's GELU,
LayerNorm and MultiheadAttention classes) on two tiny random-init CLIP ViTs whose classes lxt's map does not name
(the clip package's QuickGELU; open_clip's LayerNorm, which calls F.layer_norm itself): those are given lxt's own
`non_linear_forward` and `layer_norm_forward` with lxt's `patch_method`. No lxt code is changed or copied.

Not run by the tests (lxt needs transformers at import). Run by hand, with lxt on the path, e.g.:
    pip install --target /tmp/lxtpkgs --no-deps lxt==2.1 zennit transformers==4.57.1 tokenizers==0.22.1 \
        huggingface-hub==0.36.0 requests urllib3 certifi
    PYTHONPATH=/tmp/lxtpkgs python tests/golden-lxt/make_fixtures.py
The score where relevance starts is camloc's definition (lxt has none for CLIP): exp(logit_scale) times the cosine,
the image embedding's norm constant; the map is lxt's `(input * input.grad).sum(1)`.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).parent
MODELS = {"tiny_vit_mh": "tiny-vit-mh", "open_clip_tiny_vit": "open_clip:camloc-tiny-vit:random"}
PROMPTS = ["cat", "a dog", "grass"]
GAMMAS = {"conv": 0.25, "linear": 0.05}  # two of the values lxt's ViT example tries


def main() -> None:
    from importlib.metadata import version

    import clip.model
    import open_clip.transformer
    import zennit.rules as z_rules
    from lxt.efficient import monkey_patch, monkey_patch_zennit
    from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method
    from torchvision.models import vision_transformer
    from zennit.composites import LayerMapComposite

    from camloc.models import ClipModel
    from camloc.models.preprocess import load_image

    monkey_patch(vision_transformer)  # lxt's default map for it: vit_torch.cp_LRP (torch.nn classes)
    patch_method(non_linear_forward, clip.model.QuickGELU, keep_original=True)
    patch_method(layer_norm_forward, open_clip.transformer.LayerNorm)
    monkey_patch_zennit()
    image = load_image(HERE.parent / "golden" / "chelsea_small.png")
    meta = {"lxt": version("lxt"), "torch": torch.__version__, "prompts": PROMPTS,
            "image": "tests/golden/chelsea_small.png", "rule set": "lxt.efficient.models.vit_torch.cp_LRP",
            "gamma": "zennit " + version("zennit") + " rules.Gamma via lxt monkey_patch_zennit", "maps": {}}
    for key, name in MODELS.items():
        for suffix, gammas in (("cp", None), ("cp_gamma", GAMMAS)):
            model = ClipModel.load(name, device="cpu")
            composite = None
            if gammas:  # lxt's ViT example: zennit's Gamma on Conv2d and Linear, through monkey_patch_zennit
                composite = LayerMapComposite([(torch.nn.Conv2d, z_rules.Gamma(gammas["conv"])),
                                               (torch.nn.Linear, z_rules.Gamma(gammas["linear"]))])
                composite.register(model.visual)
            x = model.preprocess(image).expand(len(PROMPTS), -1, -1, -1).clone().requires_grad_(True)
            features = model.visual(x).float()
            unit = features / features.norm(dim=-1, keepdim=True).detach()
            scores = model.logit_scale * (unit * model.text_features(PROMPTS)).sum(dim=-1)
            scores.sum().backward()
            if composite is not None:
                composite.remove()
            maps = (x * x.grad).sum(dim=1).detach().numpy().astype(np.float32)
            np.save(HERE / f"{key}_{suffix}.npy", maps)
            meta["maps"][f"{key}_{suffix}"] = {"model": name, "gamma": gammas, "shape": list(maps.shape),
                                               "sums": maps.sum(axis=(1, 2)).tolist(), "scores": scores.detach().tolist()}
    (HERE / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    sys.exit(main())
