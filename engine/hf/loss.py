"""transformers' causal-LM loss on our fused linear cross-entropy, and the forward of a patched `*ForCausalLM`.

`causal_lm_loss` is transformers' `ForCausalLMLoss` (loss/loss_utils.py) with the logits never materialised: the labels
are shifted inside (``labels[..., 1:]`` padded with ignore_index at the end, or `shift_labels` as given), tokens whose
label is ignore_index (-100) are left out, and the loss is the mean over the others; with `num_items_in_batch`
(transformers' gradient accumulation, the loss-bearing tokens of the whole accumulated batch) it is their sum divided
by that count instead, as transformers does. The logits ``hidden @ lm_head.weight.T`` are computed in chunks by
`kernels.fused_linear_cross_entropy` (their cross-entropy in fp32, as transformers' ``logits.float()``). One difference:
a batch with no loss-bearing token gives loss 0 here (transformers: nan).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.linear_cross_entropy import fused_linear_cross_entropy

IGNORE_INDEX = -100


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
) -> torch.Tensor:
    """Next-token cross-entropy of ``hidden (b, s, H) @ weight (V, H).T`` against `labels` (b, s), shifted here, or
    against `shift_labels` (b, s) already shifted; mean over non-ignored tokens, or sum / `num_items_in_batch`."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss: needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(h.device)
    if num_items_in_batch is None:
        return fused_linear_cross_entropy(h, weight, target, ignore_index=ignore_index, backend=backend)
    loss = fused_linear_cross_entropy(h, weight, target, ignore_index=ignore_index, reduction="sum", backend=backend)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def fused_loss_forward(original: Callable, backend: str) -> Callable:
    """A `*ForCausalLM.forward` (to bind to the model) that, given labels (or shift_labels), runs the base model and
    `causal_lm_loss` on its last hidden states and returns the output with ``logits=None``; without labels it is
    `original` (the class's forward), logits as before. Its signature is the original's, which the Trainer inspects
    to choose the dataset columns it passes."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import slice_logits_to_keep
    from transformers.utils.generic import can_return_tuple

    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    cache_fields = [f for f in ("cache", "past_key_values") if f in CausalLMOutputWithPast.__dataclass_fields__]

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        extra = dict(arguments.pop(var_kw, {})) if var_kw else {}
        labels, shift_labels = arguments.pop("labels", None), extra.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return original(self, *args, **kwargs)
        del arguments["self"]
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        num_items = extra.pop("num_items_in_batch", None)
        ignore_index = extra.pop("ignore_index", IGNORE_INDEX)
        outputs = self.model(**arguments, **extra)
        hidden = slice_logits_to_keep(outputs[0], logits_to_keep)
        loss = causal_lm_loss(hidden, self.lm_head.weight, labels, shift_labels, num_items, ignore_index, backend)
        caches = {f: getattr(outputs, f, None) for f in cache_fields}
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                      attentions=getattr(outputs, "attentions", None), **caches)  # fmt: skip

    return can_return_tuple(forward)
