"""CLIP-ES GradCAM (Lin et al., CVPR 2023, "CLIP is also an efficient segmenter: a text-driven approach
for weakly supervised semantic segmentation", linyq2117/CLIP-ES `generate_cams_coco14.py`), the CAM
stage without its class-aware attention refinement: GradCAM (w_c = mean_hw G_c, M = relu(sum_c w_c A_c))
on a configuration of the shared gradient engine (`GradientTarget`):

- A: the last block's ln_1 output, patch tokens (the reference's `resblocks[-1].ln_1` target whose
  reshape drops the class token);
- the score: the reference's `forward_last_layer`: the last block, ln_post on every token, the mean of
  the patch tokens, proj, then softmax over [the image's prompts, the background words] of
  logit_scale * cos, read at the prompt.

The background words (`--background`, recorded, part of the cache key) are scored as written; a word
equal to one of the image's prompts is left out for that image (it would split the prompt's own
probability). The reference also scales the input to several sizes and fuses the maps; camloc scores
the model's own input size, as every other method.
"""
from __future__ import annotations

import torch

from camloc.cams.context import CamContext, GradientTarget
from camloc.methods.gradient import weighted_sum
from camloc.cams.options import MethodOption, method_option
from camloc.cams.registry import register_method
from camloc.errors import OptionError

CLIP_ES_BACKGROUND = ("ground,land,grass,tree,building,wall,sky,lake,water,river,sea,railway,railroad,helmet,cloud,"
                      "house,mountain,ocean,road,rock,street,valley,bridge")
"""CLIP-ES's background words for COCO (linyq2117/CLIP-ES clip_text.py, BACKGROUND_CATEGORY_COCO): its VOC list
also has keyboard and sign, which are COCO classes, so camloc's default is the COCO list."""


def word_list(value) -> str:
    """A comma list (or, from a config file or Python, a list) of words -> "w1,w2,..." without blanks or repeats."""
    words = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return ",".join(dict.fromkeys(str(w).strip() for w in words if str(w).strip()))


def parse_background(value) -> str:
    """--background: `word_list`. Empty is refused: a softmax over one prompt alone is constant, its gradient zero."""
    words = word_list(value)
    if not words:
        raise OptionError("--background is empty: CLIP-ES needs at least one background word (a softmax over a "
                          "single prompt is constant and its map all zeros); give e.g. --background ground,sky")
    return words


BACKGROUND = method_option("background", str, CLIP_ES_BACKGROUND, "CLIP-ES: comma list of background words scored "
                           "in the softmax beside the image's prompts (CLIP-ES's COCO list), as written: no prompt "
                           "template is applied.", parse_background)


def background_words(ctx: CamContext, option: MethodOption = BACKGROUND) -> tuple[str, ...]:
    """The words of a background-word option (CLIP-ES's --background by default) for this image: a word equal
    to one of its prompts left out."""
    words = [w.strip() for w in str(ctx.options.get(option.name, option.default)).split(",")]
    prompts = set(ctx.prompts)
    return tuple(w for w in dict.fromkeys(words) if w and w not in prompts)


@register_method("clip-es", families=frozenset({"vit", "vit-avg", "timm-vit"}), uses_gradients=True, params=("background",),
                 shares_forward=True,
                 prompt_coupled=True,
                 description="CLIP-ES (Lin et al. 2023): GradCAM at the last block's ln_1 with the softmax over "
                             "the prompts and --background words.")
def clip_es(ctx: CamContext) -> torch.Tensor:
    acts, grads = ctx.gradient_pass(GradientTarget("last-ln1", "patch-mean", background_words(ctx)))
    return weighted_sum(grads.mean(dim=(2, 3)), acts)
