"""PowerCAM, a camloc plug-in method in one file: LayerCAM with the positive gradients raised to a power.

    camloc eval --plugin examples/plugins/camloc-powercam/camloc_powercam/powercam.py \
        --method powercam,layercam --model tiny-vit \
        --out runs/powercam --method-option powercam_power=2

M_p = sum_c relu(G_pc)^k * A_c (element-wise over the grid). k = 1 is LayerCAM exactly (Jiang et al. 2021); a
larger k lets the strongest gradients dominate. It reads only camloc's public author surface (docs/methods.md):
the shared activations A and the one batched backward's gradients G.
"""
import camloc
from camloc.cams.options import between

POWER = camloc.method_option("powercam_power", float, 1.0, "PowerCAM: exponent of the positive gradients "
                             "(1 = LayerCAM).", between("--powercam-power", 0.1, 10))


@camloc.register_method("powercam", shares_forward=True, uses_gradients=True, params=("powercam_power",),
                        description="PowerCAM (example plug-in): sum_c relu(G_c)^k A_c; k = 1 is LayerCAM")
def powercam(ctx: camloc.CamContext):
    k = float(ctx.options.get("powercam_power", POWER.default))
    return (ctx.gradients.clamp_min(0) ** k * ctx.activations).sum(dim=1)
