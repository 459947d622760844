"""Imp's SigLIP tower + mlp2x_gelu projector -> an mmproj GGUF (llama.cpp arch `clip`).

Traps this module exists to avoid (each silently gives wrong answers, see DESIGN section 4):
- Imp drops SigLIP's last layer and reads the last kept layer *before* the post-layernorm:
  write only the kept layers, `feature_layer = [their count]` (else llama.cpp runs one fewer
  layer), and never `v.post_ln` (else llama.cpp applies it).
- `clip.use_gelu` must be true (false means quick-GELU), and no `mm.1`/`mm.3` tensors.
"""

from __future__ import annotations

import json
import math
import re

from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType, GGUFWriter, LlamaFileType

from .checkpoint import Checkpoint
from .errors import ConvertError
from .gguf_out import TensorSpec, copy_spec, weight_type

SIGLIP_SO400M_HEADS = 16
_LAYER = ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"), \
    ("self_attn.out_proj", "attn_out"), ("layer_norm1", "ln1"), ("layer_norm2", "ln2"), \
    ("mlp.fc1", "ffn_up"), ("mlp.fc2", "ffn_down")


class VisionTower:
    """Reads and checks the vision tower + projector of an Imp checkpoint."""

    def __init__(self, ckpt: Checkpoint, want: QType = QType.F16):
        self.ckpt, self.want = ckpt, want
        cfg = ckpt.config
        vcfg = cfg.get("vision_tower_config") or {}
        if isinstance(vcfg, str):  # some configs store it as a JSON string
            vcfg = json.loads(vcfg)
        patch_key = next((n for n in ckpt.tensors if n.endswith("vision_model.embeddings.patch_embedding.weight")), None)
        if patch_key is None:
            raise ConvertError(f"{ckpt.folder}: no SigLIP vision tower found in the weights")
        self.prefix = patch_key[: -len("embeddings.patch_embedding.weight")]
        self.proj = next((p for p in ("model.mm_projector.", "transformer.mm_projector.") if p + "0.weight" in ckpt.tensors), None)
        if self.proj is None:
            raise ConvertError(f"{ckpt.folder}: no mm_projector found in the weights")
        if self.proj + "1.weight" in ckpt.tensors or self.proj + "3.weight" in ckpt.tensors:
            raise ConvertError("mm_projector has more than two linear layers; only mlp2x_gelu is supported")

        self.hidden, _, self.patch, _ = ckpt.shape(patch_key, rank=4)
        n_pos, _ = ckpt.shape(self.prefix + "embeddings.position_embedding.weight", rank=2)
        side = math.isqrt(n_pos)
        if side * side != n_pos:
            raise ConvertError(f"vision position embedding has {n_pos} rows, not a square grid")
        self.image_size = int(vcfg.get("image_size") or side * self.patch)
        # The patch convolution drops a partial last patch: SigLIP-so400m's 384 px / 14 = 27.
        if self.image_size // self.patch != side:
            raise ConvertError(
                f"vision config image_size {self.image_size} does not match {n_pos} positions of patch {self.patch}"
            )
        self.n_tokens = n_pos
        layer_re = re.compile(re.escape(self.prefix) + r"encoder\.layers\.(\d+)\.")
        found = {int(m.group(1)) for n in ckpt.tensors if (m := layer_re.match(n))}
        if not found or found != set(range(len(found))):
            raise ConvertError("vision tower layers are missing or not numbered 0..N-1")
        self.n_layer = len(found)
        self.n_ff = ckpt.shape(self.prefix + "encoder.layers.0.mlp.fc1.weight", rank=2)[0]
        self.n_head = int(vcfg.get("num_attention_heads") or SIGLIP_SO400M_HEADS)
        if self.hidden % self.n_head:
            raise ConvertError(f"vision hidden size {self.hidden} is not divisible by {self.n_head} heads")
        self.eps = float(vcfg.get("layer_norm_eps") or 1e-6)
        self.proj_in = ckpt.shape(self.proj + "0.weight", rank=2)[1]
        self.proj_out = ckpt.shape(self.proj + "2.weight", rank=2)[0]
        if self.proj_in != self.hidden:
            raise ConvertError(f"projector expects width {self.proj_in}, vision tower gives {self.hidden}")
        mm_hidden = cfg.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != self.hidden:
            raise ConvertError(f"config.json says mm_hidden_size={mm_hidden} but the vision tower has {self.hidden}")

    def add_metadata(self, w: GGUFWriter) -> None:
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type("mlp")
        w.add_vision_use_gelu(True)
        w.add_vision_image_size(self.image_size)
        w.add_vision_patch_size(self.patch)
        w.add_vision_embedding_length(self.hidden)
        w.add_vision_feed_forward_length(self.n_ff)
        w.add_vision_projection_dim(self.proj_out)
        w.add_vision_block_count(self.n_layer)
        w.add_vision_head_count(self.n_head)
        w.add_vision_attention_layernorm_eps(self.eps)
        w.add_vision_image_mean([0.5, 0.5, 0.5])
        w.add_vision_image_std([0.5, 0.5, 0.5])
        # Read the output of the last kept layer; the gguf wheel has no typed helper for this key
        # and a wrong element type aborts llama.cpp, so the INT32 array is written explicitly.
        w.add_key_value("clip.vision.feature_layer", [self.n_layer], GGUFValueType.ARRAY, GGUFValueType.INT32)
        w.add_file_type(LlamaFileType.MOSTLY_Q8_0 if self.want == QType.Q8_0 else LlamaFileType.MOSTLY_F16)

    def tensors(self) -> list[TensorSpec]:
        p, H = self.prefix, self.hidden
        out = [
            # ggml's im2col convolution takes an F16 kernel; positions stay exact.
            self._copy("v.patch_embd.weight", p + "embeddings.patch_embedding.weight", (H, 3, self.patch, self.patch), QType.F16),
            self._copy("v.patch_embd.bias", p + "embeddings.patch_embedding.bias", (H,)),
            self._copy("v.position_embd.weight", p + "embeddings.position_embedding.weight", (self.n_tokens, H), QType.F32),
        ]
        for i in range(self.n_layer):
            src = f"{p}encoder.layers.{i}."
            for hf, gg in _LAYER:
                w_shape = {"mlp.fc1": (self.n_ff, H), "mlp.fc2": (H, self.n_ff)}.get(hf, (H, H))
                if hf.startswith("layer_norm"):
                    w_shape = (H,)
                out.append(self._copy(f"v.blk.{i}.{gg}.weight", src + hf + ".weight", w_shape))
                out.append(self._copy(f"v.blk.{i}.{gg}.bias", src + hf + ".bias", (w_shape[0],)))
        for j, (n_out, n_in) in ((0, (self.proj_out, H)), (2, (self.proj_out, self.proj_out))):
            out.append(self._copy(f"mm.{j}.weight", f"{self.proj}{j}.weight", (n_out, n_in)))
            out.append(self._copy(f"mm.{j}.bias", f"{self.proj}{j}.bias", (n_out,)))
        return out

    def _copy(self, out: str, src: str, shape: tuple[int, ...], qtype: QType | None = None) -> TensorSpec:
        return copy_spec(self.ckpt, out, src, shape, weight_type(shape, self.want) if qtype is None else qtype)
