"""Training on Ray Train, inference and evaluation for the guided segmenter.

    from l2l_ray.train import fit_segmenter, predict_samples, evaluate
    res = fit_segmenter(cfg, run_dir, "warmup", bundle, priors, epochs)          # -> FitResult
    probs = predict_samples(cfg, res.state_ref, "teacher", pairs, priors)        # uint8 (N, S, S)
    metrics = evaluate(cfg, res.state_ref, bundle, priors)                       # {split: {mIoU, oIoU, ...}}

The supervised baseline runs through ``l2l_ray.driver.run`` (``method=supervised``); ``l2l eval --run DIR``:
``l2l_ray.commands.evaluate.evaluate_run``. See docs/segmenter.md.
"""

from l2l_ray.train.fit import FitResult, fit_segmenter, load_checkpoint_state, tokenizer_for
from l2l_ray.train.infer import evaluate, predict_samples

__all__ = ["FitResult", "evaluate", "fit_segmenter", "load_checkpoint_state", "predict_samples", "tokenizer_for"]
