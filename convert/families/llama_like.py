"""What Phi-3 and Qwen2 share: the Llama-shaped block in Hugging Face names (RMSNorm without
bias, attention, SiLU-gated MLP, rotary over whole heads), `model.norm` and an lm_head without
bias. Each subclass names its attention and MLP tensors and its vocabulary."""

from __future__ import annotations

from gguf import MODEL_TENSOR, GGUFWriter

from ..errors import ConvertError
from ..gguf_out import TensorSpec
from .base import TextFamily

EMBED, LAYER, FINAL_NORM, HEAD = "model.embed_tokens.weight", "model.layers.{}.", "model.norm.weight", "lm_head.weight"
T = MODEL_TENSOR


class LlamaLike(TextFamily):
    defaults: dict = {}  # the published sizes, for configs that leave them out
    signature: tuple[str, ...] = ()  # layer-0 tensors (after "model.layers.0.") that identify the family

    @classmethod
    def matches(cls, ckpt) -> bool:
        return EMBED in ckpt.tensors and all(LAYER.format(0) + s + ".weight" in ckpt.tensors for s in cls.signature)

    def __init__(self, ckpt):
        super().__init__(ckpt)
        cfg, d = ckpt.config, self.defaults
        self.require(EMBED, FINAL_NORM)
        self.n_rows, self.n_embd = ckpt.shape(EMBED)
        self.config_int(("hidden_size",), self.n_embd, None)
        self.config_int(("vocab_size",), self.n_rows, None)
        self.n_layer = self.config_int(("num_hidden_layers",), self.count_layers(LAYER), None)
        down = LAYER.format(0) + "mlp.down_proj.weight"
        self.require(down)
        self.n_ff = self.config_int(("intermediate_size",), ckpt.shape(down)[1], None)
        self.n_head, _ = self.config_value(("num_attention_heads",), d["num_attention_heads"])
        if self.n_embd % self.n_head:
            raise ConvertError(f"hidden size {self.n_embd} is not divisible by {self.n_head} attention heads")
        self.head_dim = self.n_rot = self.n_embd // self.n_head
        kv_rows = self.kv_rows()
        if kv_rows % self.head_dim or not kv_rows:
            raise ConvertError(f"key/value projection width {kv_rows} is not a multiple of the head size {self.head_dim}")
        self.n_head_kv = self.config_int(("num_key_value_heads",), kv_rows // self.head_dim, None)
        self.eps, _ = self.config_value(("rms_norm_eps",), d["rms_norm_eps"], float)
        self.rope_theta, _ = self.config_value(("rope_theta",), d["rope_theta"], float)
        self.n_ctx, key = self.config_value(("max_position_embeddings",), d["max_position_embeddings"])
        self.context_from = key or f"the {self.name} default"
        if cfg.get("rope_scaling"):
            raise ConvertError(f"unsupported rope_scaling {cfg['rope_scaling']!r} (only plain rotary embeddings)")
        self.tied = HEAD not in ckpt.tensors
        if self.tied and not cfg.get("tie_word_embeddings"):
            self.require(HEAD)

    def kv_rows(self) -> int:
        """Width of the key (= value) projection, from the tensors."""
        raise NotImplementedError

    def attention(self, bid: int, p: str) -> list[TensorSpec]:
        raise NotImplementedError

    def gated_mlp(self, bid: int, p: str) -> list[TensorSpec]:
        raise NotImplementedError

    def add_vocab(self, w: GGUFWriter) -> None:
        raise NotImplementedError

    def add_metadata(self, w: GGUFWriter) -> None:
        self.add_sizes(w)
        w.add_layer_norm_rms_eps(self.eps)
        self.add_vocab(w)

    def tensors(self) -> list[TensorSpec]:
        E, F = self.n_embd, self.n_ff
        out = [self.copy(self.tensor_name(T.TOKEN_EMBD), EMBED, (self.n_rows, E))]
        for i in range(self.n_layer):
            p = LAYER.format(i)
            out.append(self.copy(self.tensor_name(T.ATTN_NORM, i), p + "input_layernorm.weight", (E,)))
            out += self.attention(i, p)
            out.append(self.copy(self.tensor_name(T.ATTN_OUT, i), p + "self_attn.o_proj.weight", (E, E)))
            out.append(self.copy(self.tensor_name(T.FFN_NORM, i), p + "post_attention_layernorm.weight", (E,)))
            out += self.gated_mlp(i, p)
            out.append(self.copy(self.tensor_name(T.FFN_DOWN, i), p + "mlp.down_proj.weight", (E, F)))
        out.append(self.copy(self.tensor_name(T.OUTPUT_NORM), FINAL_NORM, (E,)))
        # A tied head is written out: llama.cpp's phi3 requires an output tensor.
        out.append(self.copy(self.tensor_name(T.OUTPUT), EMBED if self.tied else HEAD, (self.n_rows, E)))
        return out
