"""What the MLLM backends send: the grounding prompt per family and version, the answer's JSON schema, the
image (read, resized the way the model will see it, encoded) and the chat messages. No Ray, no model code.

A prompt change must bump ``priors.prompt_version``: the version is part of the prior cache key.

    prompt = grounding_prompt("the red ball on the left", "qwen2.5-vl", "v1")
    schema = answer_schema("v1")          # for vLLM structured_outputs / OpenAI response_format
    img = load_image("x.jpg")             # uint8 (H, W, 3)
    url, (rh, rw) = model_input(img, "qwen2.5-vl", 3136, 1003520)   # data URL of the resized input
"""

from __future__ import annotations

import base64
import io

import numpy as np

from l2l_ray.priors.parsing import FAMILIES, RESIZE_FACTOR, smart_resize

_ANSWER = ('{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], "label": "<category noun>", '
           '"attributes": ["<attribute>", ...]}')
_COORDS = {
    # Qwen2.5-VL was trained on absolute pixel coordinates of its (resized) input; Qwen2-VL and Qwen3-VL on 0-1000.
    "qwen2.5-vl": "bbox_2d is the box of that object and point_2d a point inside it, in absolute pixel coordinates "
                  "of the image.",
    "qwen2-vl": "bbox_2d is the box of that object and point_2d a point inside it, as relative coordinates "
                "scaled to 0-1000.",
    "qwen3-vl": "bbox_2d is the box of that object and point_2d a point inside it, as relative coordinates "
                "scaled to 0-1000.",
}
PROMPTS = {
    "v1": ('Locate the one object in the image that the expression "{sentence}" refers to. '
           "Output its bbox coordinates using JSON format: {answer} {coords} "
           "label is the object's category noun and attributes are words describing it (colour, size, position)."),
}
MAX_SENTENCE_CHARS = 300


def grounding_prompt(sentence: str, family: str, version: str = "v1") -> str:
    """The user text that asks for one grounded object as JSON (coordinates in the family's convention)."""
    if family not in FAMILIES:
        raise ValueError(f"priors.family={family!r}: choose one of {', '.join(FAMILIES)}")
    if version not in PROMPTS:
        raise ValueError(f"priors.prompt_version={version!r}: known versions are {', '.join(PROMPTS)}")
    clean = " ".join(sentence.replace('"', "'").split())[:MAX_SENTENCE_CHARS]
    return PROMPTS[version].format(sentence=clean, answer=_ANSWER, coords=_COORDS[family])


def answer_schema(version: str = "v1") -> dict:
    """JSON schema of one answer (keys in generation order: the box first, so a truncated answer keeps it)."""
    def coords(n: int) -> dict:
        return {"type": "array", "items": {"type": "integer"}, "minItems": n, "maxItems": n}

    return {
        "type": "object",
        "properties": {
            "bbox_2d": coords(4),
            "point_2d": coords(2),
            "label": {"type": "string", "maxLength": 64},
            "attributes": {"type": "array", "items": {"type": "string", "maxLength": 32}, "maxItems": 8},
        },
        "required": ["bbox_2d", "point_2d", "label", "attributes"],
        "additionalProperties": False,
    }


def load_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB. Raises ``OSError``/``ValueError`` naming the file when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read image {path!r}: {e}") from e


def resize_for_model(image: np.ndarray, family: str, min_pixels: int, max_pixels: int):
    """(PIL image at the model's input size, (resized_h, resized_w)).

    Resizing here with the processor's own ``smart_resize`` makes the server/engine resize a no-op (an image that
    already has multiple-of-factor sides within [min, max] pixels is kept as is), so Qwen2.5-VL pixel
    coordinates are known exactly whatever min/max pixels the server was started with (if its max >= ours).
    """
    from PIL import Image

    h, w = image.shape[:2]
    rh, rw = smart_resize(h, w, RESIZE_FACTOR[family], min_pixels, max_pixels)
    pil = Image.fromarray(image)
    if (rh, rw) != (h, w):
        pil = pil.resize((rw, rh), Image.Resampling.BICUBIC)
    return pil, (rh, rw)


def data_url(pil_image, quality: int = 95) -> str:
    """``data:image/jpeg;base64,...`` of a PIL RGB image (the OpenAI chat API's image_url form)."""
    buf = io.BytesIO()
    pil_image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def model_input(image: np.ndarray, family: str, min_pixels: int, max_pixels: int) -> tuple[str, tuple[int, int]]:
    """(data URL of the resized image, (resized_h, resized_w))."""
    pil, hw = resize_for_model(image, family, min_pixels, max_pixels)
    return data_url(pil), hw


def chat_messages(prompt: str, image_part: dict) -> list[dict]:
    """OpenAI-format messages: one user turn, the image first, then the text (Qwen's own examples' order)."""
    return [{"role": "user", "content": [image_part, {"type": "text", "text": prompt}]}]


def image_url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}
