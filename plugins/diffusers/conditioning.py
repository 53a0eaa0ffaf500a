"""Text conditions as prompt ids into a cache of encoded prompts.

``encode_condition(prompts)`` returns a LongTensor of ids; the embeddings (computed once per distinct
prompt with the pipeline's own ``encode_prompt``, so penultimate hidden states, pooled embeddings and
SD3's T5 tokens are exactly diffusers') live in a ``PromptBank`` shared by the teacher, the student and
the critic. Id -1 is the unconditional input the pipeline uses for guidance: zeros for SDXL
(``force_zeros_for_empty_prompt``), the empty-prompt embedding for SD1.5 and SD3. Ids behave like class
labels, so objectives slice, concatenate and drop them (label -1) without knowing about text.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from plugins.diffusers.cache import content_key

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
    """Encoded prompts by id and the null condition. Rows live in a bounded in-memory LRU (``max_items``, CPU,
    the teacher's dtype) backed by an on-disk ``TensorStore`` when given: prompts already encoded by an earlier
    run with the same encoders are read instead of encoded, and evicted rows are read back when drawn."""

    def __init__(self, pipe, family: str, device, dtype, max_sequence_length: int = 256, store=None,
                 max_items: int = 1024):
        self.pipe, self.family, self.device, self.dtype = pipe, family, torch.device(device), dtype
        self.max_sequence_length, self.store, self.max_items = max_sequence_length, store, max_items
        self.ids: dict[str, int] = {}
        self.prompts: list[str] = []
        self.rows: OrderedDict[int, dict[str, Tensor]] = OrderedDict()  # id -> {"text": .., "pooled": ..}
        with torch.no_grad():
            null = encode_prompts(pipe, family, [""], self.device, True, max_sequence_length)
        self.null = {k: v[0].to("cpu", dtype) for k, v in null.items()}

    def __deepcopy__(self, memo):  # shared, never copied (EMA and critic copies of the student)
        return self

    def __len__(self) -> int:
        return len(self.ids)

    def _keep(self, i: int, row: dict[str, Tensor]) -> None:
        self.rows[i] = row
        self.rows.move_to_end(i)
        while len(self.rows) > self.max_items and self.store is not None:  # without a store nothing can be evicted
            self.rows.popitem(last=False)

    def _row(self, i: int) -> dict[str, Tensor]:
        row = self.rows.get(i)
        if row is None:
            row = self.store.get(content_key(self.prompts[i])) if self.store is not None else None
            if row is None:  # the cache entry vanished: encode again
                enc = encode_prompts(self.pipe, self.family, [self.prompts[i]], self.device, False,
                                     self.max_sequence_length)
                row = {k: v[0].to("cpu", self.dtype) for k, v in enc.items()}
            self._keep(i, row)
        else:
            self.rows.move_to_end(i)
        return row

    @torch.no_grad()
    def add(self, prompts: list[str]) -> Tensor:
        """Ids of ``prompts``; new ones are read from the disk cache or encoded in one batch (and stored)."""
        new = list(dict.fromkeys(p for p in prompts if p not in self.ids))
        missing = []
        for p in new:
            self.ids[p] = len(self.prompts)
            self.prompts.append(p)
            hit = self.store.get(content_key(p)) if self.store is not None else None
            if hit is None:
                missing.append(p)
            else:
                self._keep(self.ids[p], hit)
        if missing:
            enc = encode_prompts(self.pipe, self.family, missing, self.device, False, self.max_sequence_length)
            for j, p in enumerate(missing):
                row = {k: v[j].to("cpu", self.dtype) for k, v in enc.items()}
                if self.store is not None:
                    self.store.put(content_key(p), row)
                self._keep(self.ids[p], row)
        return torch.tensor([self.ids[p] for p in prompts], dtype=torch.long, device=self.device)

    def lookup(self, cond: Tensor | None, batch: int, device, dtype) -> dict[str, Tensor]:
        """Batched embeddings for ids ``cond`` ([B], -1 = unconditional; None = all unconditional)."""
        ids = [NULL] * batch if cond is None else torch.as_tensor(cond).reshape(-1).tolist()
        if len(ids) != batch:
            raise ValueError(f"got {len(ids)} prompt ids for a batch of {batch}")
        rows = [self.null if i < 0 else self._row(i) for i in ids]
        return {k: torch.stack([r[k] for r in rows]).to(device, dtype, non_blocking=True) for k in self.null}
