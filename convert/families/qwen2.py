"""Qwen1.5 backbone (Imp-v1.5-2B-Qwen1.5) -> llama.cpp arch `qwen2`.

Separate q/k/v projections with biases, gate and up projections, an untied lm_head; the
tokenizer is Qwen2's byte-level BPE (llama.cpp pre-tokenizer `qwen2`), which adds no BOS.
"""

from __future__ import annotations

from gguf import MODEL_ARCH, GGUFWriter

from ..vocab import read_bpe_vocab
from .registry import register
from .llama_like import LAYER, T, LlamaLike


@register
class Qwen2(LlamaLike):
    name = "qwen2"
    model_arch = MODEL_ARCH.QWEN2
    architectures = ("ImpQwen2ForCausalLM",)
    model_types = ("imp_qwen2",)
    chat_tokens = ("<|im_start|>", "<|im_end|>")
    signature = ("self_attn.q_proj", "mlp.gate_proj")
    defaults = dict(num_attention_heads=16, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768)

    def __init__(self, ckpt):
        super().__init__(ckpt)
        cfg = ckpt.config
        self.vocab = read_bpe_vocab(ckpt, self.n_rows, cfg.get("eos_token_id"), "<|im_end|>")
        self.bos_id = cfg.get("bos_token_id")
        self.tokenizer_from = self.vocab.source
        self.check_strip()

    def kv_rows(self) -> int:
        k = LAYER.format(0) + "self_attn.k_proj.weight"
        self.require(k)
        return self.ckpt.shape(k)[0]

    def attention(self, bid: int, p: str):
        E, kv = self.n_embd, self.n_head_kv * self.head_dim
        out = []
        for kind, hf, rows in ((T.ATTN_Q, "q_proj", E), (T.ATTN_K, "k_proj", kv), (T.ATTN_V, "v_proj", kv)):
            src = p + "self_attn." + hf
            out.append(self.copy(self.tensor_name(kind, bid), src + ".weight", (rows, E)))
            out.append(self.copy(self.tensor_name(kind, bid, "bias"), src + ".bias", (rows,)))
        return out

    def gated_mlp(self, bid: int, p: str):
        shape = (self.n_ff, self.n_embd)
        return [self.copy(self.tensor_name(T.FFN_GATE, bid), p + "mlp.gate_proj.weight", shape),
                self.copy(self.tensor_name(T.FFN_UP, bid), p + "mlp.up_proj.weight", shape)]

    def add_vocab(self, w: GGUFWriter) -> None:
        self.vocab.write_to(w, pre="qwen2")
        if self.bos_id is not None:
            w.add_bos_token_id(int(self.bos_id))
