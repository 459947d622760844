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

from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFValueType, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as QType

from .checkpoint import Checkpoint
from .errors import ConvertError
from .gguf_out import TensorSpec, copy_spec, weight_type

# Towers whose head count (no tensor shape tells it) their shapes identify:
# (hidden, intermediate) -> (name, heads).
KNOWN_TOWERS = {(1152, 4304): ("SigLIP-so400m", 16)}
# Activations llama.cpp's clip runs as SigLIP's tanh-GELU (use_gelu).
_GELU_ACTS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu")
# A SigLIP encoder layer: checkpoint module -> gguf tensor (gguf's own clip names).
_LAYER = (("self_attn.q_proj", MODEL_TENSOR.V_ENC_ATTN_Q), ("self_attn.k_proj", MODEL_TENSOR.V_ENC_ATTN_K),
          ("self_attn.v_proj", MODEL_TENSOR.V_ENC_ATTN_V), ("self_attn.out_proj", MODEL_TENSOR.V_ENC_ATTN_O),
          ("layer_norm1", MODEL_TENSOR.V_ENC_INPUT_NORM), ("layer_norm2", MODEL_TENSOR.V_ENC_POST_ATTN_NORM),
          ("mlp.fc1", MODEL_TENSOR.V_ENC_FFN_UP), ("mlp.fc2", MODEL_TENSOR.V_ENC_FFN_DOWN))


def gguf_name(tensor: MODEL_TENSOR, kind: str, bid: int | None = None) -> str:
    """`v.blk.3.attn_q.weight` and the like, from gguf's table of tensor names."""
    return TENSOR_NAMES[tensor].format(bid=bid) + "." + kind


class VisionTower:
    """Reads and checks the vision tower + projector of an Imp checkpoint.

    The sizes come from the tensors (hidden from the patch embedding, layers by counting,
    intermediate from fc1, image size from the position count x patch); the configs that describe
    the tower (config.json's vision_tower_config, a tower folder's config.json) are checked
    against them and supply what no shape tells (heads, eps), or a known tower does.
    """

    def __init__(self, ckpt: Checkpoint, want: QType = QType.F16):
        self.ckpt, self.want = ckpt, want
        cfg = ckpt.config
        patch_key = next((n for n in ckpt.tensors if n.endswith("vision_model.embeddings.patch_embedding.weight")), None)
        if patch_key is None:
            raise ConvertError(f"{ckpt.folder}: no SigLIP vision tower found in the weights")
        self.prefix = patch_key[: -len("embeddings.patch_embedding.weight")]
        self.proj = next((p for p in ("model.mm_projector.", "transformer.mm_projector.") if p + "0.weight" in ckpt.tensors), None)
        if self.proj is None:
            raise ConvertError(f"{ckpt.folder}: no mm_projector found in the weights")
        if self.proj + "1.weight" in ckpt.tensors or self.proj + "3.weight" in ckpt.tensors:
            raise ConvertError("mm_projector has more than two linear layers; only mlp2x_gelu is supported")

        shape = ckpt.shape(patch_key)
        if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
            raise ConvertError(f"vision patch embedding has shape {list(shape)}, expected [hidden, 3, patch, patch]")
        self.hidden, _, self.patch, _ = shape
        pos_key = self.prefix + "embeddings.position_embedding.weight"
        if pos_key not in ckpt.tensors:
            raise ConvertError(f"{ckpt.folder}: checkpoint is missing tensor {pos_key}")
        n_pos = ckpt.shape(pos_key, rank=2)[0]
        side = math.isqrt(n_pos)
        if side * side != n_pos:
            raise ConvertError(f"vision position embedding has {n_pos} rows, not a square grid")
        self.n_tokens = n_pos
        layer_re = re.compile(re.escape(self.prefix) + r"encoder\.layers\.(\d+)\.")
        found = {int(m.group(1)) for n in ckpt.tensors if (m := layer_re.match(n))}
        if not found or found != set(range(len(found))):
            raise ConvertError("vision tower layers are missing or not numbered 0..N-1")
        self.n_layer = len(found)
        fc1 = self.prefix + "encoder.layers.0.mlp.fc1.weight"
        if fc1 not in ckpt.tensors:
            raise ConvertError(f"{ckpt.folder}: checkpoint is missing tensor {fc1}")
        self.n_ff = ckpt.shape(fc1, rank=2)[0]

        configs = self._configs()
        for where, vcfg in configs:
            self._check(where, vcfg, side)
        # The configured size when given (the patch convolution drops a partial last patch, so
        # several sizes give the same grid), else the grid's.
        self.image_size = self._agreed(configs, "image_size", int) or side * self.patch
        heads = self._agreed(configs, "num_attention_heads", int)
        known = KNOWN_TOWERS.get((self.hidden, self.n_ff))
        if heads is None and known is None:
            raise ConvertError(
                f"cannot tell the vision tower's attention heads: no tower config (vision_tower_config in "
                f"config.json or a tower folder) and width {self.hidden} is not a known tower's"
            )
        self.n_head = heads if heads is not None else known[1]
        if self.hidden % self.n_head:
            raise ConvertError(f"vision hidden size {self.hidden} is not divisible by {self.n_head} heads")
        self.eps = self._agreed(configs, "layer_norm_eps", float) or 1e-6
        self.config_from = " + ".join(w for w, _ in configs) if configs else f"tensor shapes ({known[0]})"

        self.proj_in = ckpt.shape(self.proj + "0.weight", rank=2)[1]
        self.proj_out = ckpt.shape(self.proj + "2.weight", rank=2)[0]
        if self.proj_in != self.hidden:
            raise ConvertError(f"projector expects width {self.proj_in}, vision tower gives {self.hidden}")
        mm_hidden = cfg.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != self.hidden:
            raise ConvertError(f"config.json says mm_hidden_size={mm_hidden} but the vision tower has {self.hidden}")

    def _configs(self) -> list[tuple[str, dict]]:
        """(where, SigLIP vision config) of every config that describes the tower."""
        out = []
        vcfg = self.ckpt.config.get("vision_tower_config")
        if isinstance(vcfg, str):  # some configs store it as a JSON string
            try:
                vcfg = json.loads(vcfg)
            except ValueError:
                raise ConvertError("config.json: vision_tower_config is not valid JSON") from None
        if vcfg is not None:
            if not isinstance(vcfg, dict):
                raise ConvertError("config.json: vision_tower_config must be an object")
            out.append(("vision_tower_config", vcfg))
        folder = self.ckpt.tower_config()
        if folder is not None:
            out.append(folder)
        return out

    def _check(self, where: str, vcfg: dict, side: int) -> None:
        """A disagreement with the tensors that would change the model is an error; the layer
        count may be the kept one or the original tower's (Imp deletes the last layer: the real
        configs say 27 for 26 stored), and the tensors decide."""
        def number(key: str, kind: type = int):
            v = vcfg.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()) or v <= 0:
                raise ConvertError(f"{where}: {key} must be a positive {'integer' if kind is int else 'number'}, not {v!r}")
            return kind(v)

        for key, actual in (("hidden_size", self.hidden), ("intermediate_size", self.n_ff), ("patch_size", self.patch)):
            v = number(key)
            if v is not None and v != actual:
                raise ConvertError(f"{where} says {key}={v} but the vision tower's weights have {actual}")
        size = number("image_size")
        if size is not None and size // self.patch != side:
            raise ConvertError(f"{where} says image_size={size}, which does not match {side * side} "
                               f"position embeddings of patch {self.patch}")
        layers = number("num_hidden_layers")
        if layers is not None and layers not in (self.n_layer, self.n_layer + 1):
            raise ConvertError(f"{where} says num_hidden_layers={layers} but the weights keep {self.n_layer} "
                               f"layers (Imp keeps all but the last)")
        number("num_attention_heads"), number("layer_norm_eps", float)
        act = vcfg.get("hidden_act")
        if act is not None and act not in _GELU_ACTS:
            raise ConvertError(f"{where}: unsupported vision activation {act!r} (SigLIP uses gelu_pytorch_tanh)")

    @staticmethod
    def _agreed(configs: list[tuple[str, dict]], key: str, kind: type):
        """The value the configs give for `key` (None if none does); two that differ are an error."""
        given = [(w, kind(c[key])) for w, c in configs if c.get(key) is not None]
        if len({v for _, v in given}) > 1:
            (wa, a), (wb, b) = given[0], next(g for g in given if g[1] != given[0][1])
            raise ConvertError(f"vision tower configs disagree: {wa} says {key}={a}, {wb} says {b}")
        return given[0][1] if given else None

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
            self._copy(gguf_name(MODEL_TENSOR.V_ENC_EMBD_PATCH, "weight"), p + "embeddings.patch_embedding.weight",
                       (H, 3, self.patch, self.patch), QType.F16),
            self._copy(gguf_name(MODEL_TENSOR.V_ENC_EMBD_PATCH, "bias"), p + "embeddings.patch_embedding.bias", (H,)),
            self._copy(gguf_name(MODEL_TENSOR.V_ENC_EMBD_POS, "weight"), p + "embeddings.position_embedding.weight",
                       (self.n_tokens, H), QType.F32),
        ]
        for i in range(self.n_layer):
            src = f"{p}encoder.layers.{i}."
            for hf, tensor in _LAYER:
                w_shape = {"mlp.fc1": (self.n_ff, H), "mlp.fc2": (H, self.n_ff)}.get(hf, (H, H))
                if hf.startswith("layer_norm"):
                    w_shape = (H,)
                out.append(self._copy(gguf_name(tensor, "weight", i), src + hf + ".weight", w_shape))
                out.append(self._copy(gguf_name(tensor, "bias", i), src + hf + ".bias", (w_shape[0],)))
        for j, (n_out, n_in) in ((0, (self.proj_out, H)), (2, (self.proj_out, self.proj_out))):
            out.append(self._copy(gguf_name(MODEL_TENSOR.V_MMPROJ, "weight", j), f"{self.proj}{j}.weight", (n_out, n_in)))
            out.append(self._copy(gguf_name(MODEL_TENSOR.V_MMPROJ, "bias", j), f"{self.proj}{j}.bias", (n_out,)))
        return out

    def _copy(self, out: str, src: str, shape: tuple[int, ...], qtype: QType | None = None) -> TensorSpec:
        return copy_spec(self.ckpt, out, src, shape, weight_type(shape, self.want) if qtype is None else qtype)
