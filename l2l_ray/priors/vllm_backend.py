"""``priors.backend=vllm``: the Ray-native path, ``ray.data.llm`` with vLLM engines in a GPU actor pool.

    pip install -e '.[vllm]'         # ray[llm]==2.60.0, vllm==0.29.0 (GPU machines)
    RAY_ADDRESS=auto l2l priors --config configs/refcoco.yaml priors.backend=vllm \
        priors.model=Qwen/Qwen2.5-VL-7B-Instruct priors.family=qwen2.5-vl priors.concurrency=4 \
        priors.tensor_parallel_size=1 priors.batch_size=128 priors.accelerator_type=L4

Dataflow (``process_dataset``): request rows (the ``PriorRequest`` fields) -> ``preprocess_row`` (image read and
resized to the model input, chat messages with a data-URL image, per-row sampling params with
``structured_outputs={"json": schema}``) -> ray.data.llm stages (PrepareMultimodal, ChatTemplate, Tokenize,
vLLMEngine, Detokenize) -> ``postprocess_row`` (``generated_text`` parsed into a prior, soft proposal, one cache row
in ``cache.SCHEMA``). A fixed pool of ``priors.concurrency`` engine replicas, each on ``tensor_parallel_size`` GPUs
(ray.data.llm's rule, tensor x pipeline parallel: one GPU on the replica actor at TP 1, else a placement group of
TP x {GPU: 1, CPU: 1} bundles; ``priors.num_gpus`` is not used here), on nodes of ``priors.accelerator_type`` when
set. vllm and ray[llm] are imported only inside functions.
"""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np

from l2l_ray.config import ConfigError, PriorsConfig
from l2l_ray.priors.base import PriorRequest, register
from l2l_ray.priors.parsing import FAMILIES, RESIZE_FACTOR, attach_proposals, failed_prior, make_prior, parse_answer
from l2l_ray.priors.prompts import (
    answer_schema,
    chat_messages,
    grounding_prompt,
    image_url_part,
    load_image,
    model_input,
)
from l2l_ray.records import Prior

REQUEST_FIELDS = ("sent_id", "ref_id", "image_path", "width", "height", "sentence")
# vLLM's largest default max_num_seqs (1024 on H100/H200-class GPUs, 256 on A100, L4, A10G). ray.data.llm sends an
# engine max_concurrent_batches batches at once (8 by default), so with priors.batch_size=32 only 256 requests are in
# flight and an H100 engine runs a quarter full (Ray's engine stage warns about it). We raise max_concurrent_batches
# until batch_size x batches covers this (8 x 128, 32 x 32, 64 x 16), whatever batch size the config chose, up to
# MAX_BATCHES_IN_FLIGHT (beyond it Ray's per-task overhead outweighs the gain: use priors.batch_size >= 16).
# Recommended for vllm: priors.batch_size=128, 8 batches of 128 per engine (docs/priors.md).
ENGINE_MAX_NUM_SEQS = 1024
MAX_BATCHES_IN_FLIGHT = 64
_SKIP_TEXT = "Reply with {}."  # stand-in prompt (blank image) for rows that failed before the engine; 1 token, ignored


def processor_config(cfg: PriorsConfig):
    """The ``vLLMEngineProcessorConfig`` for ``cfg`` (multimodal stage on, errors per row, not per batch)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    # video 0: we send one image per prompt and never a video, so vLLM need not profile (or budget for) a video.
    engine_kwargs = dict(max_model_len=cfg.max_model_len, limit_mm_per_prompt={"image": 1, "video": 0},
                         tensor_parallel_size=max(1, cfg.tensor_parallel_size),
                         gpu_memory_utilization=cfg.gpu_memory_utilization,
                         mm_processor_kwargs=mm_processor_kwargs(cfg))
    batch_size = max(1, cfg.batch_size)
    n = max(1, cfg.concurrency)
    return vLLMEngineProcessorConfig(
        model_source=cfg.model, engine_kwargs=engine_kwargs, batch_size=batch_size,
        max_concurrent_batches=min(MAX_BATCHES_IN_FLIGHT, max(8, math.ceil(ENGINE_MAX_NUM_SEQS / batch_size))),
        # (n, n): a fixed pool of n replicas; an int n would be an autoscaling pool of 1..n (ray.data.llm) that
        # starts one engine and adds the others only as the queue grows, each after minutes of model loading.
        concurrency=(n, n), accelerator_type=cfg.accelerator_type or None,
        prepare_multimodal_stage={"enabled": True}, should_continue_on_error=True)


def mm_processor_kwargs(cfg: PriorsConfig) -> dict:
    """The HF image processor bounds for the engine: the same as our own resize (``priors.min_pixels`` /
    ``max_pixels``, so the engine's resize is the identity), and a bounded worst-case image for vLLM's memory
    profiling. Without them vLLM profiles with the processor's own maximum: Qwen3-VL's is 16384 * 32 * 32 pixels,
    ~16k image tokens, twice the default ``max_model_len``.

    Qwen2/2.5-VL: ``min_pixels`` / ``max_pixels`` (what vLLM's Qwen2.5-VL example passes). Qwen3-VL: ``size``
    (``shortest_edge`` / ``longest_edge``, in pixels), the keys of its image processor (transformers'
    ``Qwen2VLImageProcessor`` with patch 16) and the ones vLLM's Qwen3-VL profiling reads
    (``image_processor.size["longest_edge"]``); the flat pixel keys are deprecated there in transformers 5.
    """
    if cfg.family == "qwen3-vl":
        return {"size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}}
    return {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}


def preprocess_row(row: dict, cfg: PriorsConfig) -> dict:
    """A request row -> the engine's input row (pure apart from reading the image file).

    Adds ``messages`` (OpenAI format, data-URL image), ``sampling_params`` (greedy, ``max_tokens``, and
    ``structured_outputs={"json": <schema as a JSON string>}`` when ``priors.structured``), ``resized_h/w`` (the
    model input size, for the qwen2.5-vl pixel convention), ``image_h/w`` (the real image size) and ``pre_status``
    ("" or the reason the row cannot be asked: ``empty_sentence``/``image_error``; such rows still flow through
    the engine with a 1-token stand-in prompt so the dataset keeps every row). The schema is a string so every
    row has the same Arrow type.
    """
    out = {k: row[k] for k in REQUEST_FIELDS}
    sampling = {"temperature": 0.0, "max_tokens": int(cfg.max_tokens)}
    if cfg.structured:
        sampling["structured_outputs"] = {"json": json.dumps(answer_schema(cfg.prompt_version))}
    pre_status, note, resized, image_hw = "", "", (0, 0), (int(row["height"]), int(row["width"]))
    if not str(row["sentence"]).strip():
        pre_status = "empty_sentence"
    else:
        try:
            image = load_image(row["image_path"])
            url, resized = model_input(image, cfg.family, cfg.min_pixels, cfg.max_pixels)
            image_hw = image.shape[:2]
        except (OSError, ValueError) as e:
            pre_status, note = "image_error", str(e)
    if pre_status:  # same message shape as real rows (image + text), so every block has one Arrow type
        blank = np.zeros((RESIZE_FACTOR[cfg.family] * 2,) * 2 + (3,), np.uint8)
        messages = chat_messages(_SKIP_TEXT, image_url_part(model_input(blank, cfg.family, 0, 1 << 30)[0]))
        sampling["max_tokens"] = 1
    else:
        prompt = grounding_prompt(row["sentence"], cfg.family, cfg.prompt_version)
        messages = chat_messages(prompt, image_url_part(url))
    return {**out, "messages": messages, "sampling_params": sampling, "pre_status": pre_status, "pre_note": note,
            "resized_h": int(resized[0]), "resized_w": int(resized[1]),
            "image_h": int(image_hw[0]), "image_w": int(image_hw[1])}


def row_prior(row: dict, cfg: PriorsConfig) -> Prior:
    """An engine output row (input columns + ``generated_text``, ``__inference_error__``) -> a Prior (no proposal)."""
    req = PriorRequest(*(row[k] for k in REQUEST_FIELDS))
    model = cfg.model
    if row.get("pre_status"):
        return failed_prior(req, row["pre_status"], row.get("pre_note", ""), "vllm", model)
    if row.get("__inference_error__"):
        return failed_prior(req, "model_error", str(row["__inference_error__"]), "vllm", model)
    text = row.get("generated_text") or ""
    parsed = parse_answer(text, cfg.family, int(row["image_w"]), int(row["image_h"]),
                          resized_hw=(int(row["resized_h"]), int(row["resized_w"])),
                          min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return make_prior(req, parsed, text, "vllm", model)


def postprocess_row(row: dict, cfg: PriorsConfig) -> dict:
    """An engine output row -> one prior cache row (``cache.SCHEMA`` columns), soft proposal included.

    Drops the engine's columns (messages with the image, tokens), so only the compact record moves on.
    """
    from l2l_ray.priors.cache import prior_to_row

    prior = row_prior(row, cfg)
    image = None
    if prior.ok:
        try:
            image = load_image(row["image_path"])
        except (OSError, ValueError) as e:
            prior = failed_prior(PriorRequest(*(row[k] for k in REQUEST_FIELDS)), "image_error", str(e), "vllm",
                                 cfg.model)
    return prior_to_row(attach_proposals([prior], [image], cfg)[0])


def finish_row(row: dict, cfg: PriorsConfig) -> dict:
    """A processor output row -> exactly the ``cache.SCHEMA`` columns.

    ray.data.llm lets rows whose inference failed (``should_continue_on_error``) bypass ``postprocess`` and come
    out with all their data columns and ``__inference_error__`` set: those become ``model_error`` cache rows here.
    """
    from l2l_ray.priors.cache import SCHEMA, prior_to_row

    if row.get("__inference_error__"):
        req = PriorRequest(*(row[k] for k in REQUEST_FIELDS))
        return prior_to_row(failed_prior(req, "model_error", str(row["__inference_error__"]), "vllm", cfg.model))
    return {k: row[k] for k in SCHEMA.names}


class VLLMBackend:
    """``process_dataset(ds)`` for the pipeline (a Ray Dataset of request rows -> cache rows), and the plain
    ``list[PriorRequest] -> list[Prior]`` contract on top of it (builds a dataset from the requests)."""

    name = "vllm"

    def __init__(self, cfg: PriorsConfig):
        if cfg.family not in FAMILIES:
            raise ConfigError(f"priors.family={cfg.family!r}: choose one of {', '.join(FAMILIES)}")
        if not cfg.model:
            raise ConfigError("priors.backend=vllm needs priors.model (a hub id or a local model folder)")
        self.cfg, self.model = cfg, cfg.model
        self.processor = None  # the ray.data.llm Processor, built on first use

    def row_functions(self):
        """(preprocess, postprocess) row functions for a ray.data.llm Processor (picklable, bound to the config)."""
        return partial(preprocess_row, cfg=self.cfg), partial(postprocess_row, cfg=self.cfg)

    def build_processor(self):
        """The ray.data.llm ``Processor`` (building needs ray[llm], not a GPU; running it needs vLLM and GPUs)."""
        if self.processor is None:
            from ray.data.llm import build_processor

            pre, post = self.row_functions()
            self.processor = build_processor(processor_config(self.cfg), preprocess=pre, postprocess=post)
        return self.processor

    def process_dataset(self, ds):
        """Ray Dataset with the ``PriorRequest`` columns -> Ray Dataset of prior cache rows (lazy)."""
        return self.build_processor()(ds).map(partial(finish_row, cfg=self.cfg), num_cpus=0.25)

    def __call__(self, requests: list[PriorRequest]) -> list[Prior]:
        """Runs the processor on these requests (as a Ray Dataset) and waits for the result."""
        import pyarrow as pa
        import ray

        from l2l_ray.priors.cache import SCHEMA, table_to_priors

        if not requests:
            return []
        rows = [{k: getattr(r, k) for k in REQUEST_FIELDS} for r in requests]
        out = self.process_dataset(ray.data.from_items(rows)).take_all()
        priors = table_to_priors(pa.Table.from_pylist(out, schema=SCHEMA))
        return [priors.get(r.sent_id) or failed_prior(r, "model_error", "no output row from the engine", self.name,
                                                      self.model) for r in requests]


@register("vllm")
def build_vllm(cfg: PriorsConfig) -> VLLMBackend:
    return VLLMBackend(cfg)
