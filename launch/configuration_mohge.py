"""transformers config of a mohge export (copied next to the weights; needs no mohge install).

The mohge model dict is kept whole under `mohge`; the usual transformers names (hidden_size,
num_hidden_layers, ...) are derived from it for tools that read them.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MoHGEConfig(PretrainedConfig):
    model_type = "mohge"

    def __init__(self, mohge: dict | None = None, **kwargs):
        self.mohge = m = dict(mohge or {})
        if m:
            self.vocab_size = m["vocab_size"]
            self.hidden_size = m["d_model"]
            self.num_hidden_layers = m["n_layers"]
            self.num_attention_heads = m["n_heads"]
            self.num_key_value_heads = m["n_kv_heads"]
            self.max_position_embeddings = m["max_seq_len"]
            self.rope_theta = m["rope_theta"]
        # a tied head reuses the embedding table inside the model: nothing for transformers to tie
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
