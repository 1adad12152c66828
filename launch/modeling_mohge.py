"""transformers model of a mohge export: `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

A thin wrapper around the standalone module (modeling.py, copied alongside): the same Decoder,
with transformers' DynamicCache passed through as its KV cache, so `generate()` decodes one token
per step, and a shifted cross-entropy when `labels` are given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mohge import MoHGEConfig
from .modeling import Decoder, ExpertGroup, RMSNorm

# transformers renamed `past_key_values` to `cache` (outputs and model inputs) in the 5.x series
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MoHGEPreTrainedModel(PreTrainedModel):
    config_class = MoHGEConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Used only for weights a checkpoint lacks (normal(0, init_std), norms at one)."""
        std = self.config.mohge.get("init_std", 0.02)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, ExpertGroup):
            for p in (module.w1, module.w2, module.w3):
                torch.nn.init.normal_(p, 0.0, std)
        elif isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)


class MoHGEForCausalLM(MoHGEPreTrainedModel, GenerationMixin):
    def __init__(self, config: MoHGEConfig):
        super().__init__(config)
        self.model = Decoder(config.mohge)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.output

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, labels=None, use_cache=None,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("mohge export: pass input_ids; inputs_embeds is not supported")
        cache = cache if cache is not None else past_key_values  # the name before transformers 5.2x
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        logits = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: cache if use_cache else None})

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      cache=None, **kwargs):
        """Only the tokens the cache has not seen; positions count real (non-pad) tokens."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        return {"input_ids": input_ids[:, past:], "attention_mask": attention_mask, "position_ids": position_ids,
                CACHE: cache, "use_cache": use_cache}
