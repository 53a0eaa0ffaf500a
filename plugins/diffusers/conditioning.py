"""Text conditions as prompt ids into a cache of encoded prompts.

``encode_condition(prompts)`` returns a LongTensor of ids; the embeddings (computed once per distinct
prompt with the pipeline's own ``encode_prompt``, so penultimate hidden states, pooled embeddings and
SD3's T5 tokens are exactly diffusers') live in a ``PromptBank`` shared by the teacher, the student and
the critic. Id -1 is the unconditional input the pipeline uses for guidance: zeros for SDXL
(``force_zeros_for_empty_prompt``), the empty-prompt embedding for SD1.5 and SD3. Ids behave like class
labels, so objectives slice, concatenate and drop them (label -1) without knowing about text.
"""

from __future__ import annotations

import torch
from torch import Tensor

NULL = -1


def encode_prompts(pipe, family: str, prompts: list[str], device, negative: bool = False,
                   max_sequence_length: int = 256) -> dict[str, Tensor]:
    """The pipeline's own prompt encoding: ``{"text": [N, L, D]}`` plus ``"pooled": [N, P]`` (SDXL, SD3).
    With ``negative`` it returns the unconditional input the pipeline pairs with an absent negative prompt."""
    if family == "sd15":
        pos, neg = pipe.encode_prompt(prompts, device, 1, negative)
        return {"text": neg if negative else pos}
    if family == "sdxl":
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=negative)
    else:  # sd3
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=device,
                                                          do_classifier_free_guidance=negative,
                                                          max_sequence_length=max_sequence_length)
    return {"text": neg, "pooled": neg_pooled} if negative else {"text": pos, "pooled": pooled}


class PromptBank:
    """Encoded prompts by id (kept on CPU in the teacher's dtype, moved per batch) and the null condition."""

    def __init__(self, pipe, family: str, device, dtype, max_sequence_length: int = 256):
        self.pipe, self.family, self.device, self.dtype = pipe, family, torch.device(device), dtype
        self.max_sequence_length = max_sequence_length
        self.ids: dict[str, int] = {}
        self.rows: dict[str, list[Tensor]] = {}
        with torch.no_grad():
            null = encode_prompts(pipe, family, [""], self.device, True, max_sequence_length)
        self.null = {k: v[0].to("cpu", dtype) for k, v in null.items()}

    def __deepcopy__(self, memo):  # shared, never copied (EMA and critic copies of the student)
        return self

    def __len__(self) -> int:
        return len(self.ids)

    @torch.no_grad()
    def add(self, prompts: list[str]) -> Tensor:
        """Ids of ``prompts``, encoding the ones not seen before in one batch."""
        new = list(dict.fromkeys(p for p in prompts if p not in self.ids))
        if new:
            enc = encode_prompts(self.pipe, self.family, new, self.device, False, self.max_sequence_length)
            for i, p in enumerate(new):
                self.ids[p] = len(self.ids)
                for k, v in enc.items():
                    self.rows.setdefault(k, []).append(v[i].to("cpu", self.dtype))
        return torch.tensor([self.ids[p] for p in prompts], dtype=torch.long, device=self.device)

    def lookup(self, cond: Tensor | None, batch: int, device, dtype) -> dict[str, Tensor]:
        """Batched embeddings for ids ``cond`` ([B], -1 = unconditional; None = all unconditional)."""
        ids = [NULL] * batch if cond is None else torch.as_tensor(cond).reshape(-1).tolist()
        if len(ids) != batch:
            raise ValueError(f"got {len(ids)} prompt ids for a batch of {batch}")
        out = {}
        for k, null in self.null.items():
            rows = self.rows.get(k, [])
            out[k] = torch.stack([null if i < 0 else rows[i] for i in ids]).to(device, dtype, non_blocking=True)
        return out
