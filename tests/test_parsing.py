"""Per-family MLLM answer parsers on real output formats; expected boxes computed by hand in the comments."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from l2l_ray.config import PriorsConfig
from l2l_ray.priors.base import PriorRequest
from l2l_ray.priors.parsing import (
    attach_proposals,
    make_prior,
    parse_answer,
    smart_resize,
    spatial_words,
)
from l2l_ray.priors.prompts import answer_schema, data_url, grounding_prompt, model_input, resize_for_model
from l2l_ray.records import NO_PRIOR_REASONS

W, H = 640, 480  # original image: width 640, height 480


def box_of(text, family, w=W, h=H, **kw):
    p = parse_answer(text, family, w, h, **kw)
    assert p.status == "ok", p
    return p


def approx(box, expected):
    assert box == pytest.approx(expected, abs=1e-5)


# ---- Qwen2.5-VL: absolute pixels of the smart_resize'd input --------------------------------------------------------

def test_smart_resize_hand_values_and_parity_with_transformers():
    # 480x640: round(480/28)=17 -> 476, round(640/28)=23 -> 644; 476*644 = 306544 is within [3136, 1003520]
    assert smart_resize(480, 640) == (476, 644)
    # 1080x1920: 1092*1932 > 1003520, beta = sqrt(1080*1920/1003520) = 1.43747;
    # floor(1080/1.43747/28)=26 -> 728, floor(1920/1.43747/28)=47 -> 1316
    assert smart_resize(1080, 1920) == (728, 1316)
    # 20x30 is below min_pixels: beta = sqrt(3136/600) = 2.2862; ceil(45.72/28)=2 -> 56, ceil(68.59/28)=3 -> 84
    assert smart_resize(20, 30) == (56, 84)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h, w in [(480, 640), (1080, 1920), (20, 30), (128, 128), (333, 517), (3000, 4000), (50, 2000)]:
        for factor in (28, 32):
            assert smart_resize(h, w, factor, 3136, 1003520) == hf_smart_resize(h, w, factor, 3136, 1003520)


def test_qwen25_fenced_list_maps_back_through_smart_resize():
    # model input 644 (w) x 476 (h): x / 644, y / 476
    text = '```json\n[\n  {"bbox_2d": [100, 50, 300, 200], "label": "cat"}\n]\n```'
    p = box_of(text, "qwen2.5-vl")
    approx(p.box, (100 / 644, 50 / 476, 300 / 644, 200 / 476))  # (0.155280, 0.105042, 0.465839, 0.420168)
    assert p.category == "cat" and p.score == 1.0


def test_qwen25_explicit_resized_size_and_max_pixels():
    # the backend knows the input size (e.g. image_grid_thw * 14): it wins over smart_resize
    p = box_of('{"bbox_2d": [28, 56, 140, 112]}', "qwen2.5-vl", resized_hw=(224, 280))
    approx(p.box, (28 / 280, 56 / 224, 140 / 280, 112 / 224))  # (0.1, 0.25, 0.5, 0.5)
    # a 1920x1080 image is seen as 1316x728: the full input box is the full image
    p = box_of('{"bbox_2d": [0, 0, 1316, 728]}', "qwen2.5-vl", w=1920, h=1080)
    approx(p.box, (0, 0, 1, 1))
    # smaller max_pixels -> smaller input: 480x640 with max 200704 (256*28*28): beta = sqrt(307200/200704) = 1.23718
    # floor(480/1.23718/28)=13 -> 364, floor(640/1.23718/28)=18 -> 504
    assert smart_resize(480, 640, 28, 3136, 200704) == (364, 504)
    p = box_of('{"bbox_2d": [252, 182, 504, 364]}', "qwen2.5-vl", max_pixels=200704)
    approx(p.box, (0.5, 0.5, 1, 1))


def test_qwen25_prose_around_json_and_point():
    text = 'Sure! The object is here: {"bbox_2d": [322, 238, 644, 476], "point_2d": [483, 357], ' \
           '"label": "Red Ball", "attributes": ["red", "left"]} Hope this helps.'
    p = box_of(text, "qwen2.5-vl")
    approx(p.box, (0.5, 0.5, 1, 1))
    approx(p.points[0], (483 / 644, 357 / 476))  # (0.75, 0.75)
    assert p.category == "red ball" and p.attributes == ("red", "left")


# ---- Qwen2-VL: special-token boxes, 0-1000 --------------------------------------------------------------------------

def test_qwen2_special_token_box():
    text = "<|object_ref_start|>the red ball<|object_ref_end|><|box_start|>(100,200),(500,750)<|box_end|><|im_end|>"
    p = box_of(text, "qwen2-vl")
    approx(p.box, (0.1, 0.2, 0.5, 0.75))
    assert p.category == "the red ball"


def test_qwen2_tokens_skipped_and_json_forms():
    # decoded with skip_special_tokens=True the tokens vanish and the tuples remain
    approx(box_of("the red ball(100, 200), (500, 750)", "qwen2-vl").box, (0.1, 0.2, 0.5, 0.75))
    approx(box_of('{"bbox_2d": [250, 0, 750, 1000]}', "qwen2-vl").box, (0.25, 0, 0.75, 1))
    approx(box_of('{"bbox_2d": [[250, 0], [750, 1000]]}', "qwen2-vl").box, (0.25, 0, 0.75, 1))
    # special-token boxes are 0-1000 whatever the family says
    approx(box_of("<|box_start|>(0,0),(500,500)<|box_end|>", "qwen2.5-vl").box, (0, 0, 0.5, 0.5))


# ---- Qwen3-VL: JSON, 0-1000 -----------------------------------------------------------------------------------------

def test_qwen3_list_takes_first_valid_object():
    text = '```json\n[{"bbox_2d": [1200, 10, 1500, 90], "label": "ghost"}, ' \
           '{"bbox_2d": [100, 200, 300, 400], "label": "dog"}, {"bbox_2d": [0, 0, 10, 10], "label": "cat"}]\n```'
    p = box_of(text, "qwen3-vl")
    approx(p.box, (0.1, 0.2, 0.3, 0.4))
    assert p.category == "dog"


def test_point_only_answer_becomes_small_box_and_point():
    p = box_of('{"point_2d": [500, 300], "label": "dog"}', "qwen3-vl")
    approx(p.box, (0.45, 0.25, 0.55, 0.35))  # +-0.05 around (0.5, 0.3)
    approx(p.points[0], (0.5, 0.3))
    assert p.score == 0.5
    approx(box_of('[{"point_2d": [10, 990]}]', "qwen3-vl").box, (0, 0.94, 0.06, 1))  # clipped at the border
    assert parse_answer('{"point_2d": [1500, 300]}', "qwen3-vl", W, H).status == "box_out_of_range"


def test_truncated_json_salvaged_only_when_box_complete():
    p = box_of('```json\n[{"bbox_2d": [100, 200, 500, 750], "label": "red ba', "qwen3-vl")
    approx(p.box, (0.1, 0.2, 0.5, 0.75))
    assert p.score == 0.7  # salvaged
    p = box_of('{"label": "cup", "bbox_2d": [100, 200, 500, 750], "point_2d": [3', "qwen3-vl")
    assert p.category == "cup" and p.score == 0.7
    # the 4th number may be cut ("75" of "750"): not recoverable
    assert parse_answer('{"bbox_2d": [100, 200, 500, 75', "qwen3-vl", W, H).status == "malformed_json"
    assert parse_answer('```json\n{"bbox_2d": [10', "qwen3-vl", W, H).status == "malformed_json"
    assert parse_answer('{"bbox_2d": [1, 2, 3]}', "qwen3-vl", W, H).status == "malformed_json"
    assert parse_answer('{"bbox_2d": "left side"}', "qwen3-vl", W, H).status == "malformed_json"
    assert parse_answer('{"bbox_2d": [NaN, 1, 2, 3]}', "qwen3-vl", W, H).status == "malformed_json"


def test_empty_prose_and_no_box():
    for text in ("", "   \n", None):
        assert parse_answer(text, "qwen3-vl", W, H).status == "empty_answer"
    assert parse_answer("I cannot find that object in the image.", "qwen3-vl", W, H).status == "no_box"
    assert parse_answer('{"label": "cat", "attributes": []}', "qwen3-vl", W, H).status == "no_box"


def test_box_range_inversion_and_area():
    def status(box):
        return parse_answer(json.dumps({"bbox_2d": box}), "qwen3-vl", W, H)

    assert status([1200, 200, 1500, 750]).status == "box_out_of_range"  # entirely right of the image
    assert status([950, 100, 1100, 500]).status == "box_out_of_range"  # 0.05 of 0.15 wide inside (33% < 50%)
    approx(status([100, 200, 1010, 750]).box, (0.1, 0.2, 1.0, 0.75))  # a 1% overshoot is clipped
    approx(status([800, 100, 1100, 500]).box, (0.8, 0.1, 1.0, 0.5))  # 2/3 inside: clipped
    swapped = status([500, 750, 100, 200])  # corners listed in reverse order: reordered
    approx(swapped.box, (0.1, 0.2, 0.5, 0.75))
    assert swapped.score == 0.8
    assert status([500, 200, 100, 750]).status == "empty_box"  # only x inverted: not a consistent corner order
    assert status([100, 200, 100, 750]).status == "empty_box"  # zero width
    assert status([100, 200, 101, 750]).status == "empty_box"  # 0.001 * 640 = 0.64 px < 1 px


def test_never_raises_and_statuses_are_typed():
    good = '```json\n[{"bbox_2d": [100, 200, 500, 750], "point_2d": [300, 400], "label": "cat", "attributes": ["x"]}]'
    texts = [good[:i] for i in range(len(good) + 1)]  # every truncation of a real answer
    texts += ["{{{{", "[[[]]]", '{"bbox_2d": {"x": 1}}', "[1, 2, 3, 4, 5]", '{"bbox_2d": [true, 1, 2, 3]}',
              "\x00\xff garbage ```", '{"objects": [{"box": [1, 2, 300, 400]}]}', "<|box_start|>(1,2),(3", "[]"]
    for family in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        for text in texts:
            p = parse_answer(text, family, W, H)
            assert p.status == "ok" or p.status in NO_PRIOR_REASONS
            if p.ok:
                assert all(0.0 <= v <= 1.0 for v in p.box) and p.box[0] < p.box[2] and p.box[1] < p.box[3]
            else:
                assert p.box is None
    with pytest.raises(ValueError, match="family"):
        parse_answer(good, "llava", W, H)


# ---- Prior records, prompts, images ---------------------------------------------------------------------------------

def test_make_prior_and_proposals():
    req = PriorRequest(sent_id=7, ref_id=3, image_path="x.jpg", width=W, height=H,
                       sentence="the big ball on the upper left")
    ok = make_prior(req, parse_answer('{"bbox_2d": [0, 0, 500, 500], "label": "ball"}', "qwen3-vl", W, H),
                    "raw", "openai", "m")
    bad = make_prior(req, parse_answer("nothing here", "qwen3-vl", W, H), "nothing here", "openai", "m")
    assert (ok.sent_id, ok.ref_id, ok.status, ok.spatial) == (7, 3, "ok", ("top", "left"))
    assert bad.status == "no_box" and bad.box is None and bad.raw_text == "nothing here"
    image = np.zeros((H, W, 3), np.uint8)
    image[:240, :320] = (200, 30, 30)  # the object fills the box
    cfg = PriorsConfig(proposal_size=32)
    attach_proposals([ok, bad], [image, image], cfg)
    assert ok.proposal.shape == (32, 32) and ok.proposal.dtype == np.uint8
    assert ok.proposal[:14, :14].mean() > 200 and ok.proposal[20:, 20:].mean() < 60  # inside high, outside low
    assert bad.proposal is None  # no prior -> consumers use 0.5, never zeros
    assert spatial_words("left of the rightmost cup", ("center",)) == ("left", "right", "center")


def test_prompts_schema_and_model_input():
    text = grounding_prompt('the "red" ball  on the left', "qwen2.5-vl", "v1")
    assert "the 'red' ball on the left" in text and "absolute pixel" in text and "bbox_2d" in text
    assert "0-1000" in grounding_prompt("cup", "qwen3-vl") and "0-1000" in grounding_prompt("cup", "qwen2-vl")
    with pytest.raises(ValueError, match="prompt_version"):
        grounding_prompt("cup", "qwen3-vl", "v999")
    schema = answer_schema("v1")
    assert schema["required"] == ["bbox_2d", "point_2d", "label", "attributes"]
    assert list(schema["properties"]) [0] == "bbox_2d" and json.loads(json.dumps(schema)) == schema
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    pil, hw = resize_for_model(image, "qwen2.5-vl", 3136, 1003520)
    assert hw == (476, 644) and pil.size == (644, 476)
    url, hw = model_input(image, "qwen3-vl", 3136, 1003520)  # factor 32: round(15)*32=480, round(20)*32=640
    assert hw == (480, 640) and url.startswith("data:image/jpeg;base64,")
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (640, 480)
    assert data_url(pil).startswith("data:image/jpeg;base64,")
