"""The vllm backend: row construction and postprocessing (pure, always run), the real ``build_processor`` from the
installed ray.data.llm (no GPU needed to build it), the whole Processor on Ray Data with a CPU stand-in for the
engine stages, and the real engine behind the ``gpu`` marker.
"""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from l2l_ray.config import ConfigError, PriorsConfig
from l2l_ray.priors.base import PriorRequest, build_backend
from l2l_ray.priors.cache import SCHEMA
from l2l_ray.priors.vllm_backend import (
    VLLMBackend,
    finish_row,
    postprocess_row,
    preprocess_row,
    processor_config,
)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "im.png"
    img = np.full((480, 640, 3), 245, np.uint8)
    img[120:360, 160:480] = (220, 40, 40)  # a red rectangle: x 0.25-0.75, y 0.25-0.75
    Image.fromarray(img).save(path)
    return str(path)


def cfg_for(**kw):
    base = dict(backend="vllm", model="Qwen/Qwen2.5-VL-7B-Instruct", family="qwen2.5-vl", proposal_size=32,
                batch_size=4, concurrency=1)
    return PriorsConfig(**{**base, **kw})


def request_row(image_path, sentence="the red rectangle", sent_id=5):
    return {"sent_id": sent_id, "ref_id": 50 + sent_id, "image_path": image_path, "width": 640, "height": 480,
            "sentence": sentence}


def engine_output(pre: dict, text: str, error: str = "") -> dict:
    """A row after the engine stage: the row plus vLLMOutputData's fields and the stage's bookkeeping
    (ray/llm/_internal/batch/stages/vllm_engine_stage.py in Ray 2.60)."""
    return {**pre, "prompt": "<|im_start|>user ...", "prompt_token_ids": [1, 2, 3], "num_input_tokens": 3,
            "generated_tokens": [7] * 5, "generated_text": text, "num_generated_tokens": 5, "embeddings": None,
            "metrics": None, "request_id": 0, "batch_uuid": "abc", "time_taken_llm": 0.1, "params": "SamplingParams()",
            "__inference_error__": error}


# ---- pure row functions ---------------------------------------------------------------------------------------------

def test_preprocess_builds_messages_with_image_and_schema(image_path):
    row = preprocess_row(request_row(image_path), cfg_for())
    assert (row["resized_h"], row["resized_w"], row["image_h"], row["image_w"]) == (476, 644, 480, 640)
    assert row["pre_status"] == "" and row["sent_id"] == 5
    (msg,) = row["messages"]
    image_part, text_part = msg["content"]
    assert msg["role"] == "user" and image_part["type"] == "image_url" and text_part["type"] == "text"
    url = image_part["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (644, 476)  # already model size
    assert '"the red rectangle"' in text_part["text"]
    sp = row["sampling_params"]
    assert sp["temperature"] == 0.0 and sp["max_tokens"] == 256
    assert json.loads(sp["structured_outputs"]["json"])["required"][0] == "bbox_2d"
    assert "structured_outputs" not in preprocess_row(request_row(image_path), cfg_for(structured=False))[
        "sampling_params"]


def test_rows_that_cannot_be_asked_keep_their_reason(image_path, tmp_path):
    cfg = cfg_for()
    empty = preprocess_row(request_row(image_path, sentence="  "), cfg)
    missing = preprocess_row({**request_row(image_path), "image_path": str(tmp_path / "nope.jpg")}, cfg)
    assert empty["pre_status"] == "empty_sentence" and missing["pre_status"] == "image_error"
    assert "nope.jpg" in missing["pre_note"]
    # same message shape (image + text) so Arrow blocks agree; 1 token, ignored
    assert [p["type"] for p in missing["messages"][0]["content"]] == ["image_url", "text"]
    assert missing["sampling_params"]["max_tokens"] == 1
    out = postprocess_row(engine_output(missing, "{}"), cfg)
    assert out["status"] == "image_error" and out["proposal"] is None
    assert postprocess_row(engine_output(empty, "{}"), cfg)["status"] == "empty_sentence"


def test_postprocess_parses_generated_text_into_a_cache_row(image_path):
    cfg = cfg_for()
    pre = preprocess_row(request_row(image_path), cfg)
    # Qwen2.5-VL pixels of the 644x476 input: 161/644 = 0.25, 119/476 = 0.25, 483/644 = 0.75, 357/476 = 0.75
    text = '{"bbox_2d": [161, 119, 483, 357], "point_2d": [322, 238], "label": "rectangle", "attributes": ["red"]}'
    out = postprocess_row(engine_output(pre, text), cfg)
    assert set(out) == set(SCHEMA.names)  # only the compact record moves on (no messages, no image)
    assert out["status"] == "ok" and out["box"] == pytest.approx([0.25, 0.25, 0.75, 0.75], abs=1e-6)
    assert out["points"] == pytest.approx([0.5, 0.5]) and out["category"] == "rectangle"
    assert out["backend"] == "vllm" and out["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and out["raw_text"] == text
    mask = np.frombuffer(out["proposal"], np.uint8).reshape(32, 32)
    assert out["proposal_size"] == 32 and mask[12:20, 12:20].mean() > 200 and mask[:4, :4].mean() < 60
    for bad, status in [("", "empty_answer"), ('{"bbox_2d": [161, 119', "malformed_json"),
                        ('{"bbox_2d": [900, 700, 1200, 900]}', "box_out_of_range")]:
        row = postprocess_row(engine_output(pre, bad), cfg)
        assert row["status"] == status and row["proposal"] is None and all(np.isnan(row["box"]))
    # an engine error row bypasses postprocess in ray.data.llm; finish_row turns it into a model_error record
    err = finish_row(engine_output(pre, "", error="ValueError: prompt too long"), cfg)
    assert set(err) == set(SCHEMA.names) and err["status"] == "model_error" and "too long" in err["raw_text"]
    assert finish_row({**out, "__inference_error__": ""}, cfg) == out


def test_processor_config_from_priors_config():
    pc = processor_config(cfg_for(tensor_parallel_size=2, concurrency=3, batch_size=8, accelerator_type="H100",
                                  max_model_len=4096))
    assert pc.model_source == "Qwen/Qwen2.5-VL-7B-Instruct" and pc.batch_size == 8
    assert pc.concurrency == (3, 3)  # a fixed pool of 3 engines (an int would be an autoscaling pool of 1..3)
    assert pc.get_concurrency() == {"min_size": 3, "max_size": 3}
    assert pc.accelerator_type == "H100" and pc.should_continue_on_error is True
    assert pc.prepare_multimodal_stage == {"enabled": True}
    ek = pc.engine_kwargs
    assert ek["tensor_parallel_size"] == 2 and ek["max_model_len"] == 4096
    assert ek["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert ek["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 1003520}
    with pytest.raises(ConfigError, match="priors.model"):
        build_backend(cfg_for(model=""))


@pytest.mark.parametrize("batch_size", [1, 16, 32, 128, 512])
def test_enough_requests_in_flight_to_fill_an_engine(batch_size):
    """batch_size x max_concurrent_batches >= 1024, vLLM's default max_num_seqs on H100-class GPUs (Ray's engine
    stage warns below it), for any batch of 16 or more; the number of batches in flight stays bounded."""
    pc = processor_config(cfg_for(batch_size=batch_size))
    assert 8 <= pc.max_concurrent_batches <= 64
    if batch_size >= 16:
        assert pc.batch_size * pc.max_concurrent_batches >= 1024
    if batch_size >= 128:
        assert pc.max_concurrent_batches == 8  # Ray's default: large batches need no more


def test_qwen3_vl_gets_a_pixel_limit_its_image_processor_applies(image_path):
    """Qwen3-VL's bounds go in ``size`` (its image processor's keys, read by vLLM's profiling): parity with
    transformers' processor. Our resized input passes through it unchanged, and the worst-case image costs
    ~1k tokens instead of the 16k of the hub default (16384 * 32 * 32 pixels, twice max_model_len)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from l2l_ray.priors.parsing import smart_resize
    from l2l_ray.priors.prompts import load_image, resize_for_model

    cfg = cfg_for(family="qwen3-vl", model="Qwen/Qwen3-VL-8B-Instruct")
    kwargs = processor_config(cfg).engine_kwargs["mm_processor_kwargs"]
    assert kwargs == {"size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}}
    proc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, **kwargs)  # Qwen3-VL's: patch 16, factor 32
    for image in (load_image(image_path), np.zeros((3000, 4000, 3), np.uint8)):
        pil, (h, w) = resize_for_model(image, "qwen3-vl", cfg.min_pixels, cfg.max_pixels)
        (grid,) = proc(images=[pil], return_tensors="np")["image_grid_thw"]
        assert grid.tolist() == [1, h // 16, w // 16]  # the engine's resize is the identity

    def max_image_tokens(longest_edge: int) -> int:  # vLLM's profiling: the largest image the bounds allow
        h, w = smart_resize(9999999, 9999999, 32, cfg.min_pixels, longest_edge)
        return h * w // (32 * 32)

    assert max_image_tokens(cfg.max_pixels) <= 1024 < cfg.max_model_len < max_image_tokens(16384 * 32 * 32)


# ---- Ray Data: the real Processor -------------------------------------------------------------------------------

@pytest.mark.ray
def test_build_processor_offline(ray_session, tmp_path):
    pytest.importorskip("ray.data.llm")
    from transformers import Qwen2_5_VLConfig

    Qwen2_5_VLConfig().save_pretrained(tmp_path)  # a local model folder (config only): no hub access
    backend = build_backend(cfg_for(model=str(tmp_path), tensor_parallel_size=2))
    proc = backend.build_processor()
    assert proc.list_stage_names() == ["PrepareMultimodalStage", "ChatTemplateStage", "TokenizeStage",
                                       "vLLMEngineStage", "DetokenizeStage"]
    engine = proc.get_stage_by_name("vLLMEngineStage")
    ek = engine.fn_constructor_kwargs["engine_kwargs"]
    assert ek["tensor_parallel_size"] == 2
    assert ek["distributed_executor_backend"] == "ray"  # TP > 1: vLLM's Ray workers fill the placement group
    assert engine.map_batches_kwargs["compute"].max_size == 1


def cpu_engine_stage():
    """Stand-in for ray.data.llm's five model stages on CPU: answers by the sentence in the prompt, in the engine
    stage's output row shape; "fail" rows get the engine's error-row shape (should_continue_on_error).
    Self-contained (no module globals) so Ray can ship it to its workers by value."""
    from ray.llm._internal.batch.stages.base import StatefulStage, StatefulStageUDF

    class EngineUDF(StatefulStageUDF):
        async def udf(self, rows):
            for row in rows:
                image_part, text_part = row["messages"][0]["content"]
                assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")
                sentence = text_part["text"].split('"')[1] if '"' in text_part["text"] else ""
                text = {"gibberish": "As an AI I cannot"}.get(
                    sentence, '{"bbox_2d": [161, 119, 483, 357], "label": "rectangle"}')
                yield {"prompt": "...", "prompt_token_ids": [1, 2, 3], "num_input_tokens": 3,
                       "generated_tokens": [7] * 5, "generated_text": "" if sentence == "fail" else text,
                       "num_generated_tokens": 5, "request_id": -1 if sentence == "fail" else 0,
                       "__inference_error__": "RuntimeError: boom" if sentence == "fail" else "",
                       self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN]}

    return StatefulStage(fn=EngineUDF, fn_constructor_kwargs={},
                         map_batches_kwargs={"zero_copy_batch": True, "concurrency": 1, "num_cpus": 0.25})


@pytest.mark.ray
def test_whole_processor_on_ray_data_with_cpu_engine(ray_session, image_path, tmp_path):
    pytest.importorskip("ray.data.llm")
    from ray.data.llm import Processor

    backend = VLLMBackend(cfg_for())
    pre, post = backend.row_functions()
    backend.processor = Processor(processor_config(backend.cfg), [cpu_engine_stage()], preprocess=pre, postprocess=post,
                                  preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25})
    sentences = ["the red rectangle", "gibberish", "fail", " ", "the red rectangle"]
    requests = [PriorRequest(i, 10 + i, image_path, 640, 480, s) for i, s in enumerate(sentences)]
    requests[4] = PriorRequest(4, 14, str(tmp_path / "gone.png"), 640, 480, "the red rectangle")
    priors = backend(requests)
    assert [p.sent_id for p in priors] == [0, 1, 2, 3, 4]
    assert [p.status for p in priors] == ["ok", "no_box", "model_error", "empty_sentence", "image_error"]
    assert priors[0].box == pytest.approx((0.25, 0.25, 0.75, 0.75), abs=1e-6)
    assert priors[0].proposal.shape == (32, 32) and priors[0].backend == "vllm"
    assert "boom" in priors[2].raw_text and all(p.proposal is None for p in priors[1:])


# ---- the real engine (GPU + vllm) -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.ray
def test_real_vllm_engine(ray_session, image_path):
    """Set L2L_VLLM_TEST_MODEL to a local Qwen2.5-VL folder or hub id (default Qwen/Qwen2.5-VL-3B-Instruct)."""
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = os.environ.get("L2L_VLLM_TEST_MODEL", "Qwen/Qwen2.5-VL-3B-Instruct")
    backend = build_backend(cfg_for(model=model, max_model_len=4096, gpu_memory_utilization=0.6))
    priors = backend([PriorRequest(0, 0, image_path, 640, 480, "the red rectangle"),
                      PriorRequest(1, 1, image_path, 640, 480, "the white background above the rectangle")])
    assert priors[0].status == "ok", priors[0].raw_text
    x1, y1, x2, y2 = priors[0].box
    inter = max(0.0, min(x2, 0.75) - max(x1, 0.25)) * max(0.0, min(y2, 0.75) - max(y1, 0.25))
    iou = inter / ((x2 - x1) * (y2 - y1) + 0.25 - inter)
    assert iou > 0.5, (priors[0].box, priors[0].raw_text)
    assert priors[1].status == "ok" or priors[1].status in ("no_box", "box_out_of_range", "empty_box")
