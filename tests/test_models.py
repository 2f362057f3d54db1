"""Model layer: tiny models equal the golden weights, squash preprocessing, text cache, errors."""
import hashlib

import numpy as np
import pytest
import torch
from conftest import PREFIX, SHARED_GOLDEN, golden

from camloc.errors import CamlocError
from camloc.models import ClipModel, load_clip
from camloc.models.families import RESNET, VIT, _vit_tokens_to_grid
from camloc.models.loading import random_state_dict
from camloc.models.specs import TINY_SPECS

# sha256 over (key, tensor bytes) in sorted key order; equal to ../shared/golden/tiny_*.pt (checked below
# when that folder is present).
TINY_HASHES = {
    "tiny-rn": "6009fa1aa1f8d9e56f9d2542e1a29f28dbc1433e2895949ee282d183f58c3892",
    "tiny-vit": "15501676d6f779a1ac10c1ae5652c446a42f9a7a0bb118c6ed255541ca92c3cf",
}


def _hash(sd):
    """sha256 over (key, fp32 bytes) in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].float() if sd[k].is_floating_point() else sd[k]
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", list(PREFIX))  # the models of ../golden (tiny-vit-mh: test_frontier.py)
def test_tiny_models_are_the_golden_weights(name):
    assert _hash(random_state_dict(TINY_SPECS[name])) == TINY_HASHES[name]
    built = load_clip(name)[0].state_dict()  # as built; ClipModel then folds tiny-rn's BatchNorms on the CPU
    assert _hash({k: v for k, v in built.items()}) == TINY_HASHES[name]
    shared = SHARED_GOLDEN / f"{PREFIX[name]}.pt"
    if shared.exists():
        ref = torch.load(shared, map_location="cpu")
        assert set(ref) == set(built)
        for k, v in ref.items():
            assert torch.equal(built[k], v.float() if v.is_floating_point() else v), k


@pytest.mark.parametrize("name", list(PREFIX))  # the models of ../golden (tiny-vit-mh: test_frontier.py)
def test_squash_preprocessing_matches_golden_input(name, tiny_models, chelsea):
    x = tiny_models[name].preprocess(chelsea)
    np.testing.assert_array_equal(x.numpy(), golden(f"{PREFIX[name]}_input.npy"))


@pytest.mark.parametrize("name", list(PREFIX))  # the models of ../golden (tiny-vit-mh: test_frontier.py)
def test_embeddings_match_golden(name, tiny_models):
    model = tiny_models[name]
    x = torch.from_numpy(golden(f"{PREFIX[name]}_input.npy"))
    img = model.model.encode_image(x)
    np.testing.assert_allclose(img.numpy(), golden(f"{PREFIX[name]}_image_features.npy"), atol=1e-5)
    txt = golden(f"{PREFIX[name]}_text_features.npy")
    np.testing.assert_allclose(model.text_features(["cat"]).numpy(), txt / np.linalg.norm(txt), atol=1e-6)


def test_text_features_are_cached_per_prompt(tiny_rn):
    calls = []
    handle = tiny_rn.model.token_embedding.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        tiny_rn._text_cache.clear()
        first = tiny_rn.text_features(["a cat", "a dog"])
        second = tiny_rn.text_features(["a dog", "a cat", "a bird"])
    finally:
        handle.remove()
    assert calls == [2, 1]  # the second call encodes only the new prompt
    torch.testing.assert_close(second[0], first[1])


def test_vit_reshape_any_batch_any_square_grid():
    for batch, grid, dim in [(1, 4, 8), (3, 7, 5), (2, 14, 3)]:
        tokens = torch.randn(grid * grid + 1, batch, dim)
        out = _vit_tokens_to_grid(tokens)
        assert out.shape == (batch, dim, grid, grid)
        # patch token i sits at row i // g, column i % g
        i = grid + 2
        torch.testing.assert_close(out[:, :, i // grid, i % grid], tokens[1 + i])
    with pytest.raises(ValueError, match="square"):
        _vit_tokens_to_grid(torch.randn(11, 1, 4))


def test_families(tiny_rn, tiny_vit):
    assert tiny_rn.family is RESNET and tiny_rn.input_size == 128
    assert tiny_vit.family is VIT and tiny_vit.input_size == 64


def test_plain_state_dict_and_torchscript_checkpoints(tmp_path, tiny_rn):
    sd_path = tmp_path / "tiny.pt"
    torch.save(random_state_dict(TINY_SPECS["tiny-rn"]), sd_path)  # fp16, logit_scale fp32: like the golden .pt
    model, name = load_clip(str(sd_path))
    assert name == str(sd_path.resolve())
    assert _hash(model.state_dict()) == TINY_HASHES["tiny-rn"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_torchscript_archive_like_the_published_ones(tmp_path):
    """OpenAI publishes whole CLIP models as TorchScript archives; their state_dict rebuilds the model."""
    from camloc.models.loading import import_clip

    tokens = import_clip().tokenize(["cat"])
    traced = torch.jit.trace(load_clip("tiny-rn")[0].eval(), (torch.zeros(1, 3, 128, 128), tokens), check_trace=False)
    path = tmp_path / "RN-script.pt"
    torch.jit.save(traced, str(path))
    model, _ = load_clip(str(path))
    assert _hash(model.state_dict()) == TINY_HASHES["tiny-rn"]


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CamlocError, match=r"checkpoint file .*nope\.pt does not exist"):
        load_clip(str(tmp_path / "nope.pt"))


def test_checkpoint_that_is_not_clip(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CamlocError, match="is not a CLIP checkpoint"):
        load_clip(str(path))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CamlocError, match="could not be read"):
        load_clip(str(garbage))


def test_unknown_model_lists_valid_names():
    with pytest.raises(CamlocError, match=r"unknown model 'RN51'.*RN50x16.*ViT-B/32.*tiny-rn"):
        load_clip("RN51")


def test_official_name_without_network_says_where_it_looked(tmp_path, monkeypatch):
    from camloc.models.loading import import_clip

    clip = import_clip()

    def offline(url, root):
        raise OSError("network is unreachable")

    monkeypatch.setattr(clip.clip, "_download", offline)
    monkeypatch.setenv("CAMLOC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CamlocError) as info:
        ClipModel.load("RN50x16", device="cpu")
    msg = str(info.value)
    assert str(tmp_path / "cache" / "RN50x16.pt") in msg
    assert "network is unreachable" in msg and "--model" in msg and "\n" not in msg


def test_corrupt_cached_checkpoint_without_network_says_it_failed_the_checksum(tmp_path, monkeypatch):
    """The clip package re-downloads a cached file whose SHA-256 differs from the release's; offline
    that fails, and the error must say the file there is corrupt, not only where to put one."""
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    (tmp_path / "RN50.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(CamlocError) as info:
        ClipModel.load("RN50", device="cpu", cache_dir=tmp_path)
    msg = str(info.value)
    assert f"looked for {tmp_path / 'RN50.pt'}" in msg and "failed the clip package's SHA-256 check" in msg
    assert "delete it" in msg and "\n" not in msg


def test_official_name_uses_cached_file(tmp_path, monkeypatch):
    """A file already in the cache folder is used by the clip package's download-and-cache."""
    from camloc.models.loading import import_clip

    clip = import_clip()
    seen = {}

    def cached(url, root):
        seen["root"] = root
        path = tmp_path / "RN50.pt"
        torch.save(random_state_dict(TINY_SPECS["tiny-rn"]), path)
        return str(path)

    monkeypatch.setattr(clip.clip, "_download", cached)
    model = ClipModel.load("RN50", device="cpu", cache_dir=tmp_path)
    assert seen["root"] == str(tmp_path) and model.name == "RN50" and model.input_size == 128


def test_cpu_resnet_has_its_batchnorms_folded_with_the_same_outputs(chelsea):
    """On the CPU a ResNet runs with every BatchNorm folded into its convolution (and channels_last):
    all 19 of tiny-rn's, and the embedding equals the unfolded model's to fp32 rounding."""
    folded = ClipModel.load("tiny-rn", device="cpu")
    assert folded.batchnorms_folded == 19
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    plain = load_clip("tiny-rn")[0].eval()
    x = folded.preprocess(chelsea)
    with torch.no_grad():
        ref = plain.visual(x.contiguous())
        got = folded.visual(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert ClipModel.load("tiny-vit", device="cpu").batchnorms_folded == 0
