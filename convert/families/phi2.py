"""Phi-2 backbones (Imp-v1-3B, Imp-v1.5-3B-Phi2, Imp-v1.5-3B-196) -> llama.cpp arch `phi2`.

Two key layouts exist on the Hub and are detected by key names: the HF Phi layout
(`model.layers.N.self_attn.q_proj`) and the older phi-msft one (`transformer.h.N.mixer.Wqkv`,
q|k|v fused by rows). Both become separate attn_q/k/v tensors, so the two layouts of the same
weights give identical GGUF files.
"""

from __future__ import annotations

from gguf import MODEL_ARCH, MODEL_TENSOR
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter

from ..errors import ConvertError
from ..gguf_out import TensorSpec, weight_type
from ..vocab import read_bpe_vocab
from .registry import register
from .base import TextFamily

# Phi-2's sizes, for configs that leave them to configuration_imp.py's defaults; the context is
# Phi-2's own 2048 when no key gives Imp's training length.
PHI2_DEFAULTS = dict(
    num_attention_heads=32, partial_rotary_factor=0.4, layer_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=2048,
)
# Where the context length may be stated, in order of preference.
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "tokenizer_model_max_length")

_NEW = dict(
    embed="model.embed_tokens.weight", layer="model.layers.{}.", norm="input_layernorm",
    attn_out="self_attn.dense", fc1="mlp.fc1", fc2="mlp.fc2",
    final_norm="model.final_layernorm", head="lm_head",
)
_OLD = dict(
    embed="transformer.embd.wte.weight", layer="transformer.h.{}.", norm="ln",
    attn_out="mixer.out_proj", fc1="mlp.fc1", fc2="mlp.fc2",
    final_norm="lm_head.ln", head="lm_head.linear", qkv="mixer.Wqkv",
)


@register
class Phi2(TextFamily):
    name = "phi2"
    model_arch = MODEL_ARCH.PHI2
    architectures = ("ImpForCausalLM",)
    model_types = ("imp",)

    @classmethod
    def matches(cls, ckpt) -> bool:
        t = ckpt.tensors
        new = _NEW["embed"] in t and "model.layers.0.self_attn.q_proj.weight" in t and "model.layers.0.mlp.fc1.weight" in t
        old = _OLD["embed"] in t and "transformer.h.0.mixer.Wqkv.weight" in t
        return new or old

    def __init__(self, ckpt):
        super().__init__(ckpt)
        self.keys = _NEW if _NEW["embed"] in ckpt.tensors else _OLD
        self.layout = "hf-phi" if self.keys is _NEW else "phi-msft"
        cfg = ckpt.config
        k = self.keys
        self.n_rows, self.n_embd = ckpt.shape(k["embed"], rank=2)
        self.n_layer = self.config_int(("num_hidden_layers", "n_layer"), self.count_layers(k["layer"]), None)
        self.config_int(("hidden_size", "n_embd"), self.n_embd, None)
        self.config_int(("vocab_size",), self.n_rows, None)
        fc1 = k["layer"].format(0) + k["fc1"] + ".weight"
        self.require(fc1)
        self.n_ff = self.config_int(("intermediate_size", "n_inner"), ckpt.shape(fc1, rank=2)[0], None)

        # Sizes no tensor shape tells: from either config family (HF or phi-msft), else Phi-2's.
        self.n_head, _ = self.config_value(("num_attention_heads", "n_head"), PHI2_DEFAULTS["num_attention_heads"])
        if self.n_embd % self.n_head:
            raise ConvertError(f"hidden size {self.n_embd} is not divisible by {self.n_head} attention heads")
        n_kv, kv_key = self.config_value(("num_key_value_heads", "n_head_kv"), self.n_head)
        if n_kv != self.n_head:
            raise ConvertError(f"config.json says {kv_key}={n_kv}, but Phi-2 has no grouped-query attention "
                               f"({self.n_head} heads)")
        head_dim = self.n_embd // self.n_head
        # Phi-2 rotates only part of each head; llama.cpp rotates the whole head if this is absent.
        factor, _ = self.config_value(("partial_rotary_factor",), PHI2_DEFAULTS["partial_rotary_factor"], float)
        rotary, rotary_key = self.config_value(("rotary_dim",), int(head_dim * factor))
        if rotary_key and cfg.get("partial_rotary_factor") is not None and rotary != int(head_dim * factor):
            raise ConvertError(f"config.json disagrees with itself: rotary_dim={rotary} but "
                               f"partial_rotary_factor={factor} of head size {head_dim}")
        if not 0 < rotary <= head_dim or rotary % 2:
            raise ConvertError(f"invalid rotary dimension {rotary} for head size {head_dim}")
        self.n_rot = int(rotary)
        self.n_head_kv = self.n_head
        self.eps, _ = self.config_value(("layer_norm_eps", "layer_norm_epsilon"), PHI2_DEFAULTS["layer_norm_eps"], float)
        self.rope_theta, _ = self.config_value(("rope_theta",), PHI2_DEFAULTS["rope_theta"], float)
        self.n_ctx, key = self.config_value(CONTEXT_KEYS, PHI2_DEFAULTS["max_position_embeddings"], agree=False)
        self.context_from = key or "Phi-2 default"
        self.vocab = read_bpe_vocab(ckpt, self.n_rows, cfg.get("eos_token_id"), "</s>")
        self.tokenizer_from = self.vocab.source

    def add_metadata(self, w: GGUFWriter) -> None:
        self.add_sizes(w)
        w.add_layer_norm_eps(self.eps)
        self.vocab.write_to(w, pre="phi-2")

    def tensors(self) -> list[TensorSpec]:
        k, E, F, T = self.keys, self.n_embd, self.n_ff, MODEL_TENSOR
        out = [self.copy(self.tensor_name(T.TOKEN_EMBD), k["embed"], (self.n_rows, E))]
        for i in range(self.n_layer):
            p = k["layer"].format(i)
            out += self._linear(T.ATTN_NORM, i, p + k["norm"], (E,))
            if self.keys is _NEW:
                for kind, hf in ((T.ATTN_Q, "q_proj"), (T.ATTN_K, "k_proj"), (T.ATTN_V, "v_proj")):
                    out += self._linear(kind, i, p + "self_attn." + hf, (E, E))
            else:
                out += self._split_qkv(i, p + k["qkv"])
            out += self._linear(T.ATTN_OUT, i, p + k["attn_out"], (E, E))
            out += self._linear(T.FFN_UP, i, p + k["fc1"], (F, E))
            out += self._linear(T.FFN_DOWN, i, p + k["fc2"], (E, F))
        out += self._linear(T.OUTPUT_NORM, None, k["final_norm"], (E,))
        out += self._linear(T.OUTPUT, None, k["head"], (self.n_rows, E))
        return out

    def _linear(self, kind: MODEL_TENSOR, bid: int | None, src: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        """Weight and bias of a linear layer or a LayerNorm (shape (width,)): Phi-2 has both."""
        self.require(src + ".weight", src + ".bias")
        return [self.copy(self.tensor_name(kind, bid), src + ".weight", shape),
                self.copy(self.tensor_name(kind, bid, "bias"), src + ".bias", (shape[0],))]

    def _split_qkv(self, bid: int, src: str) -> list[TensorSpec]:
        """phi-msft's fused Wqkv holds q, k, v stacked by rows."""
        E = self.n_embd
        self.require(src + ".weight", src + ".bias")
        for suffix, shape in ((".weight", (3 * E, E)), (".bias", (3 * E,))):
            if self.ckpt.shape(src + suffix) != shape:
                raise ConvertError(f"tensor {src + suffix} has shape {list(self.ckpt.shape(src + suffix))}, expected {list(shape)}")
        out = []
        for j, kind in enumerate((MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V)):
            rows = slice(j * E, (j + 1) * E)
            out.append(TensorSpec(self.tensor_name(kind, bid), (E, E), weight_type((E, E), QType.F16),
                                  lambda s=src, r=rows: self.ckpt.load(s + ".weight")[r]))
            out.append(TensorSpec(self.tensor_name(kind, bid, "bias"), (E,), QType.F32,
                                  lambda s=src, r=rows: self.ckpt.load(s + ".bias")[r]))
        return out

