"""The guided hierarchical segmenter (pure PyTorch; no Ray imports anywhere in this package).

    from l2l_ray.model import build_segmenter, build_tokenizer, load_tokenizer, make_batch
    tok = build_tokenizer(train_sentences, run_dir)          # run_dir/tokenizer.json
    model = build_segmenter(cfg, tok)                        # cfg.model.preset: tiny | lavt_swin_b | convnext_b
    batch = make_batch(images_u8, *tok.encode(texts))        # no prior -> uninformative 0.5 map
    loss, parts = model.loss({**batch, "target": t, "weight": w}); probs = model.predict(batch)

See docs/segmenter.md.
"""

from l2l_ray.model.inputs import IMAGE_MEAN, IMAGE_STD, MAX_POINTS, make_batch, normalize_images, prior_arrays
from l2l_ray.model.presets import Preset, get_preset, preset_names, register, resolve_preset
from l2l_ray.model.segmenter import Segmenter, bce_dice_per_sample, build_segmenter, count_parameters
from l2l_ray.model.text import TextTokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "IMAGE_MEAN", "IMAGE_STD", "MAX_POINTS", "Preset", "Segmenter", "TextTokenizer", "bce_dice_per_sample",
    "build_segmenter", "build_tokenizer", "count_parameters", "get_preset", "load_tokenizer", "make_batch",
    "normalize_images", "preset_names", "prior_arrays", "register", "resolve_preset",
]
