"""Phi-3-mini backbone (Imp-v1.5-4B-Phi3) -> llama.cpp arch `phi3`.

Phi-3 keeps q|k|v fused in `qkv_proj` and gate|up in `gate_up_proj`, in the order llama.cpp's
phi3 graph splits them (attn_qkv; ffn_up holding the gate first), so both are copied as they are.
Its tokenizer is SentencePiece, whose special tokens swallow the newline after them.
"""

from __future__ import annotations

from gguf import MODEL_ARCH, GGUFWriter

from ..vocab_spm import read_spm_vocab
from .registry import register
from .llama_like import LAYER, T, LlamaLike


@register
class Phi3(LlamaLike):
    name = "phi3"
    model_arch = MODEL_ARCH.PHI3
    architectures = ("ImpPhi3ForCausalLM",)
    model_types = ("imp_phi3",)
    chat_tokens = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    signature = ("self_attn.qkv_proj", "mlp.gate_up_proj")
    defaults = dict(num_attention_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)

    def __init__(self, ckpt):
        super().__init__(ckpt)
        cfg = ckpt.config
        self.sliding_window = cfg.get("sliding_window")
        self.vocab = read_spm_vocab(ckpt, self.n_rows, cfg.get("bos_token_id"), cfg.get("eos_token_id"))
        self.tokenizer_from = self.vocab.source
        self.check_strip()
        # Imp's Phi-3 stops on <|end|> (eos), <|endoftext|> and <|assistant|>. A GGUF holds no
        # list of stop ids: llama.cpp ends generation on eos, on the eot id and on tokens named
        # like <|endoftext|> or <|end|>, so <|assistant|> goes in the eot slot.
        self.eot_id = self.vocab.special.get("<|assistant|>")

    def kv_rows(self) -> int:
        qkv = LAYER.format(0) + "self_attn.qkv_proj.weight"
        self.require(qkv)
        rows = self.ckpt.shape(qkv)[0] - self.n_embd
        return rows // 2 if rows > 0 and rows % 2 == 0 else 0

    def attention(self, bid: int, p: str):
        rows = self.n_embd + 2 * self.n_head_kv * self.head_dim
        return [self.copy(self.tensor_name(T.ATTN_QKV, bid), p + "self_attn.qkv_proj.weight", (rows, self.n_embd))]

    def gated_mlp(self, bid: int, p: str):
        return [self.copy(self.tensor_name(T.FFN_UP, bid), p + "mlp.gate_up_proj.weight", (2 * self.n_ff, self.n_embd))]

    def add_vocab(self, w: GGUFWriter) -> None:
        if self.sliding_window:
            w.add_sliding_window(int(self.sliding_window))
        self.vocab.write_to(w)
        if self.eot_id is not None:
            w.add_eot_token_id(self.eot_id)
