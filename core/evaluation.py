"""Built-in: evaluate and preview the student while it trains. Scores against exact samples when the teacher
has them (``sample_exact``: the GMM mixtures); otherwise a small preview grid is all it draws."""

from __future__ import annotations

import torch

from core import files, hookimpl
from core.generation import generate


class Evaluation:
    def __init__(self, trainer):
        self.trainer = trainer
        self.tr = trainer.cfg.train
        self.exact = hasattr(trainer.teacher, "sample_exact")
        self.labels = None  # class labels of the last evaluation's samples (class-conditional teachers)

    @torch.no_grad()
    def evaluate(self, n: int | None = None, seed: int = 1234) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """Sample the student (own RNG stream, so training stays reproducible) and score it."""
        from core.metrics import gmm_report

        t, teacher = self.trainer, self.trainer.teacher
        n = n or self.tr.eval_samples
        if not self.exact:  # nothing to score against: a preview grid is all we need (SDXL images are costly)
            n = min(n, getattr(teacher, "preview_samples", 16))
        # own stream on every device, so rank 0's evaluation leaves the shared training stream untouched
        with torch.random.fork_rng(devices=[t.device] if t.device.type == "cuda" else []):
            torch.manual_seed(seed)
            raw = t.networks.dataset.sample(n)["cond"] if t.networks.dataset is not None else None
            cond = teacher.encode_condition(raw) if raw is not None else None
            samples = generate(t.sampling_model(), t.spec, n, cond, t.registry, t.device, shape=teacher.data_shape)
            samples = teacher.to_data_space(samples)
            labels = self.labels = cond if getattr(teacher, "num_classes", 0) else None
            if not self.exact:
                return {}, samples, None
            reference = teacher.sample_exact(n, labels)
        return gmm_report(teacher, samples.float(), reference), samples, reference

    def write_preview(self, samples, reference) -> str:
        from core.preview import class_grid_png, preview_png

        url = files.join(self.trainer.out, "preview.png")
        labelled = samples.ndim == 4 and self.labels is not None  # images: one row per class
        files.write_bytes_atomic(url, class_grid_png(samples, self.labels, per_row=8) if labelled
                                 else preview_png(samples, reference))
        return url

    def _gather(self) -> bool:
        """Collective under FSDP; True on the rank that evaluates."""
        self.trainer.gather_full()
        return self.trainer.main

    @hookimpl(tryfirst=True)
    def fewstep_log(self, trainer, record):
        step, total = record["step"], self.tr.steps
        if self.tr.eval_every and self.exact and (step % self.tr.eval_every == 0 or step == total) and self._gather():
            scores, _, _ = self.evaluate()
            record.update({f"eval/{k}": v for k, v in scores.items()})

    @hookimpl
    def fewstep_iteration_end(self, trainer, step):
        every = self.tr.preview_every
        if every and step % every == 0 and step != self.tr.steps and self._gather():
            _, samples, reference = self.evaluate(min(self.tr.eval_samples, 2000))
            self.write_preview(samples, reference)

    @hookimpl(tryfirst=True)
    def fewstep_run_end(self, trainer, result):
        if trainer.main:  # the loop gathered the final weights before exporting them
            result["metrics"], samples, reference = self.evaluate()
            result["preview"] = self.write_preview(samples, reference)
