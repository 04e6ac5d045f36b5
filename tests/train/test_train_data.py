"""ndopt.train.data: procedural clips (deterministic, in-vocabulary captions, held-out pairs), folders, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ndopt.errors import NdoptError
from ndopt.train.data import (
    DataConfig,
    FolderVideos,
    LatentCache,
    ProceduralConfig,
    ProceduralVideos,
    caption_words,
    collate,
)
from ndopt.train.prompt_following import shape_colour


def test_procedural_is_a_function_of_seed_and_index():
    a, b = ProceduralVideos(seed=3), ProceduralVideos(seed=3)
    x, y = a[17], b[17]
    assert x.caption == y.caption and torch.equal(x.video, y.video)
    assert x.video.shape == (3, 9, 64, 64) and x.video.min() >= -1 and x.video.max() <= 1
    assert ProceduralVideos(seed=4)[17].caption != x.caption or not torch.equal(ProceduralVideos(seed=4)[17].video,
                                                                               x.video)


def test_caption_words_are_whole_tokens_of_the_tiny_tokenizer():
    from ndopt.frontends.pyramid_flow.text import tiny_tokenizers

    tok = tiny_tokenizers().tokenizer
    vocab = tok.get_vocab()
    config = ProceduralConfig()
    missing = sorted(w for w in caption_words(config) if w not in vocab)
    assert not missing, f"caption words outside the tiny tokenizer's vocabulary: {missing}"
    ds = ProceduralVideos(config)
    for i in range(50):
        cap = ds.scene(i)[0].caption
        ids = tok(cap, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(cap.split()) and tok.unk_token_id not in ids, cap


def test_held_out_pairs_never_appear_in_training_captions():
    config = ProceduralConfig()
    train = ProceduralVideos(config)
    held = {f"{c} {s}" for c, s in config.held_out}
    for i in range(400):
        sc = train.scene(i)[0]
        assert f"{sc.colour} {sc.shape}" not in held
    test = ProceduralVideos(config, held_out=True)
    assert all((test.scene(i)[0].colour, test.scene(i)[0].shape) in set(config.held_out) for i in range(20))


def test_shape_colour_reads_the_rendered_colour():
    config = ProceduralConfig()
    ds = ProceduralVideos(config, seed=5)
    hits = sum(shape_colour(ds[i].video[:, 0], config.colours) == ds.scene(i)[0].colour for i in range(24))
    assert hits >= 22  # tiny "small" shapes on a similar background may be missed
    flat = torch.zeros(3, 64, 64)
    assert shape_colour(flat, config.colours) is None


def test_bad_procedural_config():
    with pytest.raises(NdoptError, match="colours"):
        ProceduralConfig(colours=("red", "mauve"))
    with pytest.raises(NdoptError, match="1 \\+ 8k"):
        ProceduralConfig(frames=4)


def test_folder_dataset(tmp_path):
    import imageio.v3 as iio

    frames = np.zeros((9, 48, 80, 3), dtype=np.uint8)
    for t in range(9):  # a box moving right (identical frames would be merged by the GIF writer)
        frames[t, 10:20, 30 + 2 * t:40 + 2 * t] = (255, 0, 0)
    iio.imwrite(tmp_path / "clip.gif", frames, extension=".gif")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"video": "clip.gif", "caption": "a red box"}) + "\n")
    ds = FolderVideos(tmp_path, frames=9, height=64, width=64)
    ex = ds[0]
    assert len(ds) == 1 and ex.caption == "a red box" and ex.video.shape == (3, 9, 64, 64)
    with pytest.raises(NdoptError, match="captions.jsonl"):
        FolderVideos(tmp_path / "nowhere")
    (tmp_path / "captions.jsonl").write_text('{"video": "clip.gif"}\n')
    with pytest.raises(NdoptError, match=":1: expected"):
        FolderVideos(tmp_path)


def test_latent_cache_encodes_once(tiny, tmp_path):
    enc = tiny["vae_encoder"].module
    ds = ProceduralVideos(seed=1)
    cache = LatentCache(ds, enc, tmp_path, size=3, batch_size=2).load()
    assert cache.path.is_file() and len(cache) == 3
    ex = cache[2]
    assert ex.caption == ds[2].caption and ex.latents.shape == (16, 2, 8, 8)
    again = LatentCache(ds, enc, tmp_path, size=3)
    calls = []
    h = enc.register_forward_hook(lambda *a: calls.append(1))
    try:
        again.load()
    finally:
        h.remove()
    assert not calls and torch.equal(again[2].latents, ex.latents)


def test_collate_keeps_positions_and_seeds():
    ds = ProceduralVideos()
    b = collate([ds[0], ds[1]], [10, 11], [5, 6])
    assert b.videos.shape == (2, 3, 9, 64, 64) and b.latents is None and b.indices.tolist() == [10, 11]
    assert torch.equal(torch.randn(3, generator=b.generators()[0]), torch.randn(3, generator=torch.Generator().manual_seed(5)))


def test_training_captions_extend_the_latent_caches_captions(tiny, tmp_path):
    """The trajectory bank's captions: the first `clips` are the encoded clips' captions (same scenes);
    procedural data goes on with new scenes (more distinct captions), a folder repeats its own."""
    from ndopt.train.finetune import training_captions, training_latents

    spec = DataConfig(clips=3).seeded(2)
    cache = training_latents(tiny, spec, tmp_path / "cache")
    more = training_captions(spec, 40)
    assert more[:3] == list(cache.captions) and len(set(more)) > 20 and more == training_captions(spec, 40)
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "captions.jsonl").write_text(
        "".join(json.dumps({"video": f"{i}.gif", "caption": c}) + "\n" for i, c in enumerate(["a", "b"])))
    assert training_captions(DataConfig(source=str(tmp_path / "clips")), 5) == ["a", "b", "a", "b", "a"]


def test_training_captions_over_the_prompt_space_include_the_held_out_pairs():
    """held_out=True: a teacher's prompt space, every (colour, shape) pair of the vocabulary (the held-out
    ones included, which the training captions never have); deterministic; a folder is unchanged."""
    from ndopt.train.finetune import training_captions

    config, spec = ProceduralConfig(), DataConfig(clips=3).seeded(2)
    held = [f"{c} {s} " for c, s in config.held_out]
    space = training_captions(spec, 400, held_out=True)
    assert space == training_captions(spec, 400, held_out=True)
    assert all(any(h in c for c in space) for h in held)  # every held-out pair is drawn
    assert not any(h in c for c in training_captions(spec, 400) for h in held)
    pairs = {tuple(c.split()[1:3]) if c.split()[1] != "large" else tuple(c.split()[2:4]) for c in space}
    assert len(pairs) == len(config.colours) * len(config.shapes)


def test_data_config_is_the_recipes_data_and_takes_the_runs_seed():
    """One class for a fine-tuning pass's `data`: recipe fields validated (unknown ones and bad values
    named), the procedural seed from the run (`seeded`), never from the recipe or the config dump."""
    from pydantic import ValidationError

    from ndopt.train.finetune import training_captions

    with pytest.raises(ValidationError, match="clips"):
        DataConfig(clips=0)
    with pytest.raises(ValidationError, match="seed"):
        DataConfig(seed=3)
    a, b = DataConfig(clips=3).seeded(1), DataConfig(clips=3).seeded(2)
    assert (a.seed, b.seed, DataConfig().seed) == (1, 2, 0) and a.model_dump() == b.model_dump()
    assert training_captions(a, 8) != training_captions(b, 8) and training_captions(a, 8) == training_captions(a, 8)
