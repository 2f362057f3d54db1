"""The faithfulness protocols' model stage (`camloc.evaluators.faithfulness` defines them): one image's
perturbed copies scored by the model in batches, for each pending (pair, method) and its raw-size map.
Shared by eval and rescore; runs on the thread that owns the model."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from camloc.evaluators.faithfulness import (FAITH_PROTOCOLS, FaithSettings, auc, baseline_image, eclip_images,
                                            image_noise, impute, input_map, pixel_ranks, rise_counts, rise_images,
                                            road_keep, road_seed)
from camloc.models import ClipModel

DEFAULT_FAITH_BATCH = 64


def wants_faithfulness(protocols) -> bool:
    return bool(set(protocols) & set(FAITH_PROTOCOLS))


class Scorer:
    """The score of batches of model inputs for one prompt among `prompts`: the softmax probability
    (of CLIP's logits) or the cosine, in chunks of `batch` images."""

    def __init__(self, model: ClipModel, prompts: list[str], score: str, batch: int = DEFAULT_FAITH_BATCH):
        self.model = model
        self.prompts = list(prompts)
        self.text = model.text_features(self.prompts)
        self.score = score
        self.batch = max(1, int(batch))

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, n, n) normalised inputs -> (B, P) fp32 logits."""
        out = []
        with torch.no_grad():
            for start in range(0, inputs.shape[0], self.batch):
                features = self.model.encoder(self.model.as_input(inputs[start:start + self.batch]))
                if self.score == "cosine":
                    f = features / features.norm(dim=-1, keepdim=True)
                    out.append(torch.nan_to_num(f @ self.text.T, nan=0.0))
                else:
                    out.append(self.model.scores(features, self.text))
        return torch.cat(out).cpu()

    def of(self, inputs: torch.Tensor, prompt: str) -> np.ndarray:
        logits = self.logits(inputs)
        column = self.prompts.index(prompt)
        if self.score == "cosine":
            return logits[:, column].double().numpy()
        return torch.softmax(logits.double(), dim=1)[:, column].numpy()


def faith_values(model: ClipModel, image: Image.Image, host_input: torch.Tensor, pairs: list, todo: dict,
                 protocols, settings: FaithSettings, heatmap_of, image_prompts: list[str],
                 dataset_prompts: list[str], seed: int, image_id, batch: int = DEFAULT_FAITH_BATCH) -> dict:
    """{(pair.key, method): record fields} of the selected faithfulness protocols, for one image."""
    x = host_input[0].float().cpu()
    n = x.shape[-1]
    selected = set(protocols)
    rise = selected & {"deletion-rise", "insertion-rise"}
    softmax_alone = settings.score == "softmax" and len(image_prompts) < 2
    local = Scorer(model, image_prompts, settings.score, batch)
    substrates = {mode: baseline_image(x, getattr(settings, f"baseline_{mode}"))
                  for mode in ("deletion", "insertion") if f"{mode}-rise" in rise}
    counts = rise_counts(n * n, settings.steps)
    if "deletion-eclip" in selected:
        classifier = Scorer(model, dataset_prompts, "softmax", batch)
        pixels = np.asarray(image.convert("RGB"))
        noise = image_noise(seed, image_id, pixels.shape[:2])
        clean = classifier.logits(host_input.float().cpu())[0]
    clean_score: dict = {}
    out: dict = {}
    for pair in pairs:
        for method in todo[pair.key]:
            heatmap = heatmap_of(pair, method)
            fields: dict = {}
            saliency = input_map(heatmap, n)
            for mode in ("deletion", "insertion"):
                if f"{mode}-rise" not in rise:
                    continue
                if softmax_alone:
                    fields[f"{mode}_rise"] = None
                    continue
                ranks = pixel_ranks(saliency)
                curve = local.of(rise_images(x, ranks, counts, mode, substrates[mode]), pair.prompt)
                fields[f"{mode}_rise"] = {"auc": auc(curve), "curve": [float(v) for v in curve]}
            if "deletion-eclip" in selected:
                steps = eclip_images(pixels, heatmap, noise, settings.eclip_steps, settings.eclip_every)
                inputs = torch.cat([model.host_input(Image.fromarray(s)).float().cpu() for s in steps])
                logits = torch.cat([clean[None], classifier.logits(inputs)])
                target = classifier.prompts.index(pair.prompt)
                ranks = (logits > logits[:, target:target + 1]).sum(dim=1)
                fields["deletion_eclip"] = {"ranks": [int(r) for r in ranks]}
            if "road" in selected:
                if softmax_alone:
                    fields["road"] = None
                else:
                    fields["road"] = road_values(local, x, saliency, pair, method, settings, seed, clean_score)
            out[(pair.key, method)] = fields
    return out


def road_values(scorer: Scorer, x: torch.Tensor, saliency: np.ndarray, pair, method: str, settings: FaithSettings,
                seed: int, clean_score: dict) -> dict:
    """ROAD's MoRF and LeRF score changes at each percentile for one pair's map (min-max scaled)."""
    low, high = saliency.min(), saliency.max()
    s = (saliency - low) / (high - low) if high > low else np.zeros_like(saliency)
    s = s.astype(np.float32)
    images, plan = [], []
    for kind in ("morf", "lerf"):
        for p in settings.road_percentiles:
            generator = torch.Generator().manual_seed(road_seed(seed, pair.image_id, pair.category_id, method, kind, p))
            images.append(impute(x, road_keep(s, p, kind), settings.road_noise, generator))
            plan.append(kind)
    if pair.prompt not in clean_score:
        clean_score[pair.prompt] = float(scorer.of(x[None], pair.prompt)[0])
    scores = scorer.of(torch.stack(images), pair.prompt) - clean_score[pair.prompt]
    return {kind: [float(v) for v, k in zip(scores, plan) if k == kind] for kind in ("morf", "lerf")}
