"""``priors.backend=hf``: a Qwen-VL model through transformers on one device (no vLLM, no server).

    l2l priors --config configs/synthetic.yaml priors.backend=hf priors.model=/models/Qwen2.5-VL-3B-Instruct \
        priors.family=qwen2.5-vl priors.batch_size=8 priors.num_gpus=1

``priors.model`` is a hub id or a local folder (offline works with a local folder or ``HF_HUB_OFFLINE=1`` and a
filled cache). The model class follows ``priors.family``; greedy decoding, ``priors.max_tokens`` new tokens. No
constrained decoding here: the answer is parsed like any other untrusted text (``parsing.parse_answer``). The
model input size comes from the processor's own ``image_grid_thw``, so Qwen2.5-VL pixel coordinates map back
exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from l2l_ray.config import ConfigError, PriorsConfig
from l2l_ray.priors.base import PriorRequest, register
from l2l_ray.priors.parsing import FAMILIES, attach_proposals, failed_prior, make_prior, parse_answer
from l2l_ray.priors.prompts import chat_messages, grounding_prompt, load_image
from l2l_ray.records import Prior

log = logging.getLogger(__name__)

MODEL_CLASSES = {"qwen2-vl": "Qwen2VLForConditionalGeneration", "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3-vl": "Qwen3VLForConditionalGeneration"}
PROCESSOR_CLASSES = {"qwen2-vl": "Qwen2VLProcessor", "qwen2.5-vl": "Qwen2_5_VLProcessor",
                     "qwen3-vl": "Qwen3VLProcessor"}
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def load_processor(path: str, family: str):
    """The model's processor (``AutoProcessor``).

    transformers >= 5 cannot build the Qwen-VL *video* processor without torchvision, and so no Qwen-VL
    processor at all. Images do not need it: then this builds the family's processor class without its video
    part, from the same tokenizer, image processor (the PIL twin) and chat template, i.e. the same image ->
    token expansion, ``image_grid_thw`` and ``mm_token_type_ids`` as the full processor.
    """
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError) as e:
        if "torchvision" not in str(e).lower() and "VIDEO_PROCESSOR" not in str(e):
            raise
        log.info("%s: no torchvision, building an image-only %s", path, PROCESSOR_CLASSES[family])
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    base = getattr(transformers, PROCESSOR_CLASSES[family])
    image_only = type(f"ImageOnly{base.__name__}", (base,),
                      {"get_attributes": classmethod(lambda cls: ["image_processor", "tokenizer"])})
    # The base __init__ passes (image_processor, tokenizer, video_processor=None) on; ProcessorMixin pairs them with
    # get_attributes(), so the missing video processor is simply not an attribute.
    return image_only(image_processor, tokenizer, None, chat_template=_chat_template(path, tokenizer))


def _chat_template(path: str, tokenizer) -> str | None:
    """The processor's chat template: chat_template.jinja, chat_template.json, or the tokenizer's own."""
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        import json

        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    if folder.is_dir():
        return getattr(tokenizer, "chat_template", None)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, "chat_template.jinja")).read_text()
    except Exception:  # noqa: BLE001 - older repos keep it in the tokenizer config
        return getattr(tokenizer, "chat_template", None)


class HFBackend:
    """Callable ``list[PriorRequest] -> list[Prior]``; loads the model on first use (in the prior actor)."""

    name = "hf"

    def __init__(self, cfg: PriorsConfig):
        if cfg.family not in FAMILIES:
            raise ConfigError(f"priors.family={cfg.family!r}: choose one of {', '.join(FAMILIES)}")
        if not cfg.model:
            raise ConfigError("priors.backend=hf needs priors.model (a hub id or a local model folder)")
        self.cfg, self.model = cfg, cfg.model
        self.processor = self.net = self.device = None

    def load(self) -> HFBackend:
        import torch
        import transformers

        cfg = self.cfg
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                                   else cfg.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.processor = load_processor(cfg.model, cfg.family)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batched generation
        model_cls = getattr(transformers, MODEL_CLASSES[cfg.family])
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
        self.net = model_cls.from_pretrained(cfg.model, **{dtype_kw: dtype}).to(self.device).eval()
        return self

    def __call__(self, requests: list[PriorRequest]) -> list[Prior]:
        """One prior per request, in order. A failing generate() turns its mini-batch into ``model_error``."""
        if self.net is None:
            self.load()
        priors: list[Prior | None] = [None] * len(requests)
        images: list[np.ndarray | None] = [None] * len(requests)
        todo = []
        for i, req in enumerate(requests):
            if not req.sentence.strip():
                priors[i] = failed_prior(req, "empty_sentence", "", self.name, self.model)
                continue
            try:
                images[i] = load_image(req.image_path)
                todo.append(i)
            except (OSError, ValueError) as e:
                priors[i] = failed_prior(req, "image_error", str(e), self.name, self.model)
        for start in range(0, len(todo), max(1, self.cfg.batch_size)):
            chunk = todo[start: start + max(1, self.cfg.batch_size)]
            self._run_chunk([requests[i] for i in chunk], [images[i] for i in chunk], chunk, priors, images)
        return attach_proposals(priors, images, self.cfg)

    def _run_chunk(self, reqs, imgs, idx, priors, images) -> None:
        cfg = self.cfg
        try:
            texts, sizes = self.generate([grounding_prompt(r.sentence, cfg.family, cfg.prompt_version) for r in reqs],
                                         imgs)
        except Exception as e:  # noqa: BLE001 - an OOM or a bad input must not stop the run
            log.warning("hf generate failed on %d requests: %r", len(reqs), e)
            for i, r in zip(idx, reqs, strict=True):
                priors[i] = failed_prior(r, "model_error", f"{type(e).__name__}: {e}", self.name, self.model)
                images[i] = None
            return
        for i, r, img, text, hw in zip(idx, reqs, imgs, texts, sizes, strict=True):
            parsed = parse_answer(text, cfg.family, img.shape[1], img.shape[0], resized_hw=hw,
                                  min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
            priors[i] = make_prior(r, parsed, text, self.name, self.model)

    def generate(self, prompts: list[str], images: list[np.ndarray]) -> tuple[list[str], list[tuple[int, int]]]:
        """Greedy answers for (prompt, image uint8 (H, W, 3)) pairs, and each image's model input (h, w) pixels."""
        import torch
        from PIL import Image

        proc, cfg = self.processor, self.cfg
        texts = [proc.apply_chat_template(chat_messages(p, {"type": "image"}), tokenize=False,
                                          add_generation_prompt=True) for p in prompts]
        inputs = proc(text=texts, images=[Image.fromarray(im) for im in images], padding=True, return_tensors="pt",
                      size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}).to(self.device)
        with torch.inference_mode():
            out = self.net.generate(**inputs, max_new_tokens=cfg.max_tokens, do_sample=False,
                                    pad_token_id=proc.tokenizer.pad_token_id)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (B, T_new): left padding keeps prompts aligned
        answers = [_cut_at_end(t) for t in proc.tokenizer.batch_decode(new_tokens, skip_special_tokens=False)]
        patch = proc.image_processor.patch_size
        grid = inputs["image_grid_thw"].tolist()  # (B, 3): temporal, height, width patches
        return answers, [(int(g[1]) * patch, int(g[2]) * patch) for g in grid]


def _cut_at_end(text: str) -> str:
    """Drop everything from the first end-of-turn / padding token (special tokens such as boxes stay)."""
    for tok in _END_TOKENS:
        text = text.split(tok, 1)[0]
    return text


@register("hf")
def build_hf(cfg: PriorsConfig) -> HFBackend:
    return HFBackend(cfg)
