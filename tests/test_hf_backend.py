"""The hf backend end to end with a tiny, randomly initialised Qwen2.5-VL built from a config, saved to a local
folder with a real image processor (Qwen2VLImageProcessor) and a byte-level BPE tokenizer trained here with
``tokenizers`` (the Qwen special tokens included), loaded back offline through the backend's own loader.

Its answers are nonsense: the test checks the plumbing (chat template -> processor -> generate -> decode -> parse)
and that nonsense becomes typed no-prior statuses, never an exception.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from l2l_ray.config import ConfigError, PriorsConfig
from l2l_ray.priors.base import PriorRequest, build_backend
from l2l_ray.priors.parsing import smart_resize
from l2l_ray.records import NO_PRIOR_REASONS

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
           "<|video_pad|>"]
# Qwen2-VL's chat template, image and text parts only (the published one also handles video and ids).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen25_vl(folder) -> None:
    """Write a complete local Qwen2.5-VL model folder (config, weights, tokenizer, image processor, template)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ['{"bbox_2d": [12, 345, 678, 901], "point_2d": [23, 45], "label": "red ball", "attributes": ["left"]}',
              "You are a helpful assistant. Locate the one object in the image that the expression refers to."] * 4
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL[1:])
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, bos_token_id=ids("<|endoftext|>"),
                eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0], window_size=56)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                              video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                              vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    build_tiny_qwen25_vl(folder)
    return str(folder)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in {"wide": (100, 140), "square": (64, 64), "sliver": (2, 600)}.items():
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[name])
    return paths


def test_tiny_qwen25_vl_end_to_end(tiny_model, images, tmp_path):
    cfg = PriorsConfig(backend="hf", model=tiny_model, family="qwen2.5-vl", device="cpu", max_tokens=12, batch_size=2,
                       min_pixels=56 * 56, max_pixels=28 * 28 * 16, proposal_size=16)
    backend = build_backend(cfg).load()
    assert type(backend.net).__name__ == "Qwen2_5_VLForConditionalGeneration"
    # the image -> model input size comes from the processor's image_grid_thw (patch 14): it must equal smart_resize
    arrays = [np.asarray(Image.open(images[k])) for k in ("wide", "square")]
    texts, sizes = backend.generate(["Locate the red ball.", "Locate the cup."], arrays)
    # 100x140 with max 12544: beta = sqrt(14000/12544) = 1.0565 -> floor(3.38)*28 = 84, floor(4.73)*28 = 112
    assert sizes == [(84, 112), (56, 56)]
    assert sizes == [smart_resize(100, 140, 28, 3136, 12544), smart_resize(64, 64, 28, 3136, 12544)]
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    requests = [PriorRequest(sent_id=i, ref_id=10 + i, image_path=images[name], width=0, height=0, sentence=s)
                for i, (name, s) in enumerate([("wide", "the red ball on the left"), ("square", "the small cup"),
                                               ("square", " "), ("wide", "the dog")])]
    requests.append(PriorRequest(4, 14, str(tmp_path / "missing.png"), 0, 0, "anything"))
    priors = backend(requests)
    assert [p.sent_id for p in priors] == [0, 1, 2, 3, 4]
    for p in priors:
        assert p.status == "ok" or p.status in NO_PRIOR_REASONS, p
        assert p.backend == "hf" and p.model == tiny_model
        assert (p.box is None) == (not p.ok) and (p.proposal is None) == (not p.ok)
    assert priors[2].status == "empty_sentence" and priors[4].status == "image_error"
    # random weights answer nonsense: parsed, kept for auditing, typed
    assert all(p.status in ("empty_answer", "no_box", "malformed_json", "box_out_of_range", "empty_box", "ok")
               for p in (priors[0], priors[1], priors[3]))
    assert priors[0].spatial == ("left",)


def test_failing_generate_is_a_model_error_for_its_batch_only(tiny_model, images):
    cfg = PriorsConfig(backend="hf", model=tiny_model, family="qwen2.5-vl", device="cpu", max_tokens=4, batch_size=1,
                       min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    backend = build_backend(cfg)
    # a 600x2 image: the image processor refuses aspect ratios above 200 -> that batch fails inside generate()
    sliver, ok = backend([PriorRequest(0, 0, images["sliver"], 600, 2, "the line"),
                          PriorRequest(1, 1, images["square"], 64, 64, "the cup")])
    assert sliver.status == "model_error" and "aspect ratio" in sliver.raw_text
    assert ok.status != "model_error"


def test_config_errors():
    with pytest.raises(ConfigError, match="priors.model"):
        build_backend(PriorsConfig(backend="hf", model=""))
    with pytest.raises(ConfigError, match="family"):
        build_backend(PriorsConfig(backend="hf", model="x", family="qwen9"))
