"""Reference Imp implementation (the "oracle"): transformers + torch, float32, CPU.

It reads the checkpoint folder on its own (config.json, tokenizer.json, safetensors) and shares no
code with the product (convert/, imp_cli/) nor with tests/factory.py, so that it can judge them:
  - language model, by config.json's model_type: transformers' PhiForCausalLM ("imp"; the old
    phi-msft layout is renamed to HF Phi names and its fused Wqkv split into q, k, v rows),
    Phi3ForCausalLM ("imp_phi3") or Qwen2ForCausalLM ("imp_qwen2");
  - vision: transformers' SiglipVisionModel built with the KEPT layer count found in the weights
    (and, for configs without vision_tower_config, SigLIP-so400m's sizes read from the shapes);
    Imp's feature is the output of the last kept layer, before post_layernorm;
  - Imp's preprocessing, projector, prompt templates and `tokenizer_image_token`, written out
    here in a few lines: the tokenizer is the checkpoint's tokenizer.json run by `tokenizers`.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import (DynamicCache, Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel)

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
PAD_COLOR = (127, 127, 127)  # int(0.5 * 255) per channel: Imp's image_mean as a colour

# Phi-2's values, used when config.json omits the language-model sizes (newer Imp configs do).
# Those that the tensor shapes determine (hidden, layers, intermediate, rows) are read from them.
_PHI2 = {"heads": 32, "partial_rotary_factor": 0.4, "eps": 1e-5, "rope_theta": 10000.0,
         "max_positions": 2048}


def _read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor in its stored dtype: load_state_dict casts into the model's parameters, so a
    float16 checkpoint never exists in memory twice over as float32 (19 GB instead of 25 for 3B)."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        with safe_open(str(ckpt / name), framework="pt") as f:
            for key in f.keys():
                weights[key] = f.get_tensor(key)
    return weights


def _rename_old_layout(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """phi-msft keys (imp-v1-3b) -> HF Phi keys; Wqkv rows are q | k | v."""
    out = {}
    for key, t in w.items():
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", key)
        if m:
            layer, module, kind = m.groups()
            p = f"model.layers.{layer}."
            if module == "mixer.Wqkv":
                q, k, v = t.chunk(3, dim=0)
                out.update({f"{p}self_attn.q_proj.{kind}": q, f"{p}self_attn.k_proj.{kind}": k,
                            f"{p}self_attn.v_proj.{kind}": v})
                continue
            new = {"ln": "input_layernorm", "mixer.out_proj": "self_attn.dense",
                   "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}[module]
            out[f"{p}{new}.{kind}"] = t
        elif key.startswith("transformer.embd.wte."):
            out["model.embed_tokens." + key.rsplit(".", 1)[1]] = t
        elif key.startswith("lm_head.ln."):
            out["model.final_layernorm." + key.rsplit(".", 1)[1]] = t
        elif key.startswith("lm_head.linear."):
            out["lm_head." + key.rsplit(".", 1)[1]] = t
        elif key.startswith("transformer."):
            out["model." + key[len("transformer."):]] = t
        else:
            raise KeyError(f"unexpected key in an old-layout checkpoint: {key}")
    return out


# Imp's conversation templates (its conversation.py), one turn, and the tokens that end an answer.
TEMPLATES = {
    "phi2": "{system} USER: <image>\n{question} ASSISTANT:",
    "phi3": "<|system|>\n{system}<|end|>\n<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n",
    "qwen2": ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<image>\n{question}<|im_end|>\n"
              "<|im_start|>assistant\n"),
}
# An earlier (question, answer) turn, as it precedes the current question.
TURNS = {
    "phi2": "{question} ASSISTANT: {answer}</s>USER: ",
    "phi3": "{question}<|end|>\n<|assistant|>\n{answer}<|end|>\n<|user|>\n",
    "qwen2": "{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n<|im_start|>user\n",
}
STOPS = {"phi2": ("</s>", "<|endoftext|>"), "phi3": ("<|end|>", "<|endoftext|>", "<|assistant|>"),
         "qwen2": ("<|im_end|>", "<|endoftext|>")}
FAMILY_OF = {"imp": "phi2", "imp_phi3": "phi3", "imp_qwen2": "qwen2"}
SO400M_HEADS = 16  # SigLIP-so400m (mm_vision_tower), for configs without vision_tower_config


def _rope(config_cls, theta: float) -> dict:
    """transformers 5 takes rope_parameters; 4.x takes rope_theta."""
    import inspect as _inspect

    if "rope_parameters" in _inspect.signature(config_cls.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


class Oracle:
    """transformers reference for one Imp (Phi-2, Phi-3 or Qwen2 + SigLIP) checkpoint folder, computing
    in `dtype` (float32, the reference, unless a benchmark asks for bfloat16)."""

    def __init__(self, ckpt_dir: str | Path, dtype: torch.dtype = torch.float32):
        ckpt = Path(ckpt_dir)
        self.dtype = dtype
        cfg = json.loads((ckpt / "config.json").read_text())
        self.config = cfg
        self.family = FAMILY_OF[cfg["model_type"]]
        self.aspect = cfg.get("image_aspect_ratio", "square")
        self.tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        tcfg = json.loads((ckpt / "tokenizer_config.json").read_text())
        # transformers rebuilds the BOS part of the post-processor from add_bos_token
        self.add_special = bool(tcfg.get("add_bos_token", True))
        bos = tcfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        self.bos_id = self.tokenizer.token_to_id(bos) if bos else None
        self.image_id = self.tokenizer.token_to_id("<image>")
        self.stop_ids = {self.tokenizer.token_to_id(t) for t in STOPS[self.family]}

        w = _read_weights(ckpt)
        self.layout = "old" if "transformer.embd.wte.weight" in w else "new"
        if self.layout == "old":
            w = _rename_old_layout(w)
        lm = {k: v for k, v in w.items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
        vis_prefix = "model.vision_tower.vision_tower."
        vis = {k[len(vis_prefix):]: v for k, v in w.items() if k.startswith(vis_prefix)}
        proj = {k[len("model.mm_projector."):]: v for k, v in w.items() if k.startswith("model.mm_projector.")}

        build = {"phi2": self._build_lm, "phi3": self._build_phi3, "qwen2": self._build_qwen2}[self.family]
        self.lm = build(cfg, lm)
        # transformers 5.24 renamed forward's past_key_values to cache (the old name warns).
        self._cache_kwarg = ("cache" if "cache" in inspect.signature(self.lm.forward).parameters
                             else "past_key_values")
        self.vision = self._build_vision(cfg.get("vision_tower_config") or self._so400m_config(cfg, vis), vis)
        # Imp's mlp2x_gelu projector: Linear -> GELU (exact erf) -> Linear.
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(*proj["0.weight"].shape[::-1]), torch.nn.GELU(),
            torch.nn.Linear(*proj["2.weight"].shape[::-1]))
        self.projector.load_state_dict(proj, strict=True)
        self.projector.eval()
        for module in (self.lm, self.vision, self.projector):
            module.to(dtype)
        self.image_size = self.vision.config.image_size
        self.vocab_rows = self.lm.config.vocab_size
        self.n_tokens = self.tokenizer.get_vocab_size()  # real tokens; rows beyond are padding

    # --- model construction -------------------------------------------------------------------
    @staticmethod
    def _build_lm(cfg: dict, w: dict[str, torch.Tensor]) -> PhiForCausalLM:
        rows, hidden = w["model.embed_tokens.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("model.layers."))
        heads = _first(cfg, "num_attention_heads", "n_head", default=_PHI2["heads"])
        head_dim = hidden // heads
        if cfg.get("rotary_dim") is not None:  # phi-msft configs
            factor = cfg["rotary_dim"] / head_dim
        else:
            factor = cfg.get("partial_rotary_factor", _PHI2["partial_rotary_factor"])
        config = PhiConfig(
            vocab_size=rows, hidden_size=hidden, num_hidden_layers=layers,
            intermediate_size=w["model.layers.0.mlp.fc1.weight"].shape[0],
            num_attention_heads=heads, num_key_value_heads=heads,
            hidden_act="gelu_new",
            layer_norm_eps=_first(cfg, "layer_norm_eps", "layer_norm_epsilon", default=_PHI2["eps"]),
            max_position_embeddings=_first(cfg, "max_position_embeddings", "n_positions",
                                           default=_PHI2["max_positions"]),
            # transformers 5 moves these two into config.rope_parameters; 4.x reads them as is.
            partial_rotary_factor=factor, rope_theta=cfg.get("rope_theta", _PHI2["rope_theta"]),
            qk_layernorm=False, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
            tie_word_embeddings=False, attn_implementation="eager",
        )
        model = PhiForCausalLM(config)
        model.load_state_dict(w, strict=True)
        return model.float().eval()

    @staticmethod
    def _llama_like_sizes(cfg: dict, w: dict[str, torch.Tensor]) -> dict:
        rows, hidden = w["model.embed_tokens.weight"].shape
        return dict(
            vocab_size=rows, hidden_size=hidden,
            num_hidden_layers=1 + max(int(k.split(".")[2]) for k in w if k.startswith("model.layers.")),
            intermediate_size=w["model.layers.0.mlp.down_proj.weight"].shape[1],
            num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
            max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg["rms_norm_eps"],
            hidden_act=cfg.get("hidden_act", "silu"), tie_word_embeddings=False, attention_dropout=0.0,
            attn_implementation="eager",
        )

    @classmethod
    def _build_phi3(cls, cfg: dict, w: dict[str, torch.Tensor]) -> Phi3ForCausalLM:
        config = Phi3Config(
            **cls._llama_like_sizes(cfg, w), **_rope(Phi3Config, cfg["rope_theta"]),
            original_max_position_embeddings=cfg.get("original_max_position_embeddings", 4096),
            sliding_window=cfg.get("sliding_window"), resid_pdrop=0.0, embd_pdrop=0.0,
            pad_token_id=None, bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        )
        model = Phi3ForCausalLM(config)
        model.load_state_dict(w, strict=True)
        return model.float().eval()

    @classmethod
    def _build_qwen2(cls, cfg: dict, w: dict[str, torch.Tensor]) -> Qwen2ForCausalLM:
        config = Qwen2Config(
            **cls._llama_like_sizes(cfg, w), **_rope(Qwen2Config, cfg["rope_theta"]),
            use_sliding_window=False, bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        )
        model = Qwen2ForCausalLM(config)
        model.load_state_dict(w, strict=True)
        return model.float().eval()

    @staticmethod
    def _so400m_config(cfg: dict, w: dict[str, torch.Tensor]) -> dict:
        """SigLIP-so400m's config (the tower mm_vision_tower names), sizes read from the weights."""
        if "so400m" not in cfg.get("mm_vision_tower", ""):
            raise ValueError(f"no vision_tower_config and an unknown tower {cfg.get('mm_vision_tower')!r}")
        hidden, _, patch, _ = w["vision_model.embeddings.patch_embedding.weight"].shape
        side = int(round(w["vision_model.embeddings.position_embedding.weight"].shape[0] ** 0.5))
        return dict(hidden_size=hidden, patch_size=patch, image_size=side * patch, num_attention_heads=SO400M_HEADS,
                    intermediate_size=w["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0])

    @staticmethod
    def _build_vision(vcfg: dict, w: dict[str, torch.Tensor]) -> SiglipVisionModel:
        kept = 1 + max(int(k.split(".")[3]) for k in w if k.startswith("vision_model.encoder.layers."))
        config = SiglipVisionConfig(
            hidden_size=vcfg["hidden_size"], intermediate_size=vcfg["intermediate_size"],
            num_attention_heads=vcfg["num_attention_heads"], num_hidden_layers=kept,
            image_size=vcfg["image_size"], patch_size=vcfg["patch_size"], num_channels=3,
            hidden_act=vcfg.get("hidden_act", "gelu_pytorch_tanh"),
            layer_norm_eps=vcfg.get("layer_norm_eps", 1e-6), attention_dropout=0.0,
            vision_use_head=False, attn_implementation="eager",
        )
        model = SiglipVisionModel(config)
        if not any(k.startswith("vision_model.") for k in model.state_dict()):
            # transformers 5 dropped the .vision_model wrapper that 4.x (and Imp's files) have.
            w = {k.removeprefix("vision_model."): v for k, v in w.items()}
        model.load_state_dict(w, strict=True)  # includes the unused post_layernorm
        return model.float().eval()

    # --- image --------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Imp's preprocessing -> [1, 3, S, S] float32.

        RGB (plain PIL convert, no EXIF handling: callers pass an already-oriented image); for
        aspect "pad", centre on a square canvas of the longer side filled with (127,127,127), as
        LLaVA's expand2square; squash-resize to S x S with PIL BICUBIC; x/255; (x - 0.5) / 0.5.
        """
        img = image.convert("RGB")
        w, h = img.size
        if self.aspect == "pad" and w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), PAD_COLOR)
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas
        img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        return ((x - 0.5) / 0.5).permute(2, 0, 1).unsqueeze(0)

    @torch.no_grad()
    def _image_embeds(self, image: Image.Image) -> torch.Tensor:
        out = self.vision(pixel_values=self.preprocess(image).to(self.dtype), output_hidden_states=True)
        # hidden_states[-1] = output of the last kept layer, before post_layernorm (Imp's feature).
        return self.projector(out.hidden_states[-1][0])

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """Projected image embeddings, [n_patches, text_hidden]."""
        return self._image_embeds(image).float().numpy()

    # --- text ---------------------------------------------------------------------------------
    def prompt_ids(self, question: str, system: str | None = None,
                   history: tuple = ()) -> tuple[list[int], list[int]]:
        """Token ids before and after <image> in the family's template (TEMPLATES), with earlier
        (question, answer) turns in `history` (the image in the first turn; TURNS).

        As Imp's tokenizer_image_token: each side of <image> tokenized on its own (special tokens
        added as the tokenizer does); a BOS that starts the first side is kept and the first token
        of every side is then dropped (the BOS each side got).
        """
        earlier = "".join(TURNS[self.family].format(question=q, answer=a) for q, a in history)
        return self.image_prompt_ids(TEMPLATES[self.family].format(
            system=DEFAULT_SYSTEM if system is None else system, question=earlier + question))

    def image_prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Imp's tokenizer_image_token on any prompt holding one <image>: (ids before, ids after)."""
        chunks = [self.tokenizer.encode(c, add_special_tokens=self.add_special).ids for c in prompt.split("<image>")]
        assert len(chunks) == 2, "one <image> per prompt"
        offset = 1 if chunks[0] and self.bos_id is not None and chunks[0][0] == self.bos_id else 0
        before, after = chunks[0][offset:], chunks[1][offset:]
        return ([chunks[0][0]] if offset else []) + before, after

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.lm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))

    def _prompt_embeds(self, image: Image.Image, question: str, system: str | None,
                       history: tuple = ()) -> torch.Tensor:
        before, after = self.prompt_ids(question, system, history)
        return torch.cat([self._embed(before), self._image_embeds(image), self._embed(after)])

    @torch.no_grad()
    def _logits(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=embeds.unsqueeze(0), use_cache=False).logits[0]

    def first_logits(self, image: Image.Image, question: str, system: str | None = None) -> np.ndarray:
        """Logits [vocab_rows] for the first answer token.

        In factory checkpoints some rows (padding, <image>, ...) carry a large negative bias:
        scale differences by logits[factory.predictable_ids()].std(), not the whole vector's.
        """
        with torch.no_grad():
            return self._logits(self._prompt_embeds(image, question, system))[-1].float().numpy()

    @torch.no_grad()
    def greedy(self, image: Image.Image, question: str, n_tokens: int, stop_at_eos: bool = True,
               system: str | None = None, history: tuple = ()) -> list[int]:
        """Greedy (argmax, first index on ties) answer ids, at most n_tokens; a stop token
        (</s> or <|endoftext|>) ends the answer and is not included."""
        return self._greedy_from(self._prompt_embeds(image, question, system, history), n_tokens, stop_at_eos)

    def _greedy_from(self, embeds: torch.Tensor, n_tokens: int, stop_at_eos: bool = True) -> list[int]:
        cache = DynamicCache()  # updated in place by each forward
        ids: list[int] = []
        while len(ids) < n_tokens:
            logits = self.lm(inputs_embeds=embeds.unsqueeze(0), use_cache=True,
                             **{self._cache_kwarg: cache}).logits
            tok = int(logits[0, -1].argmax())
            if stop_at_eos and tok in self.stop_ids:
                break
            ids.append(tok)
            embeds = self._embed([tok])
        return ids

    @torch.no_grad()
    def chat_greedy(self, image: Image.Image | None, questions: list[str], n_tokens: int,
                    system: str | None = None) -> list[list[int]]:
        """A conversation's greedy answers, turn by turn, as Imp's own conversation runs it: each
        answer is decoded, stripped, and goes back as text where the template puts it (TURNS),
        e.g. Phi-2's `{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`, and
        the whole prompt is tokenized again (tokenizer_image_token) whatever ids the model had
        generated. Every turn is run from scratch. Without an image (None) the template without
        `<image>\n`, tokenized in one piece."""
        answers: list[list[int]] = []
        history: list[tuple[str, str]] = []
        for question in questions:
            ids = self._greedy_from(self._conversation_embeds(image, question, system, tuple(history)), n_tokens)
            answers.append(ids)
            history.append((question, self.tokenizer.decode(ids, skip_special_tokens=True).strip()))
        return answers

    def conversation_ids(self, question: str, history: tuple = (), system: str | None = None) -> list[int]:
        """Imp's prompt without an image (the template without `<image>\n`), in one piece."""
        earlier = "".join(TURNS[self.family].format(question=q, answer=a) for q, a in history)
        prompt = TEMPLATES[self.family].replace("<image>\n", "").format(
            system=DEFAULT_SYSTEM if system is None else system, question=earlier + question)
        return self.tokenizer.encode(prompt, add_special_tokens=self.add_special).ids

    def _conversation_embeds(self, image: Image.Image | None, question: str, system: str | None,
                             history: tuple) -> torch.Tensor:
        if image is None:
            return self._embed(self.conversation_ids(question, history, system))
        return self._prompt_embeds(image, question, system, history)

    def answer_text(self, image: Image.Image, question: str, n_tokens: int, system: str | None = None,
                    history: tuple = ()) -> str:
        """The greedy answer as a user sees it: the ids decoded byte-level, special tokens
        (<|endoftext|>, </s>, <image>) skipped, NO clean_up_tokenization_spaces, then str.strip()
        on both ends (as Imp's own scripts do with `.strip()`)."""
        ids = self.greedy(image, question, n_tokens, system=system, history=history)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def teacher_forced_logits(self, image: Image.Image, question: str, token_ids: list[int],
                              system: str | None = None) -> np.ndarray:
        """Row i: the logits [vocab_rows] after prompt + token_ids[:i]; len(token_ids) rows.

        Lets a test tell a real mismatch from a near-tie (small top-1/top-2 margin)."""
        if not token_ids:
            return np.zeros((0, self.vocab_rows), dtype=np.float32)
        with torch.no_grad():
            embeds = torch.cat([self._prompt_embeds(image, question, system),
                                self._embed(list(token_ids[:-1]))])
            return self._logits(embeds)[-len(token_ids):].float().numpy()

    def answer_logprob(self, image: Image.Image, question: str, answer: str, system: str | None = None) -> float:
        """log P(the model answers exactly `answer`): Imp writes an answer as
        `ASSISTANT: {answer}</s>`, so the tokens of " {answer}</s>" (tokenized on their own, as
        generated) after the prompt, each token's log-softmax over all rows, summed."""
        ids = self.tokenizer.encode(f" {answer}</s>", add_special_tokens=False).ids
        logits = torch.from_numpy(self.teacher_forced_logits(image, question, ids, system)).double()
        return float(torch.log_softmax(logits, dim=-1)[torch.arange(len(ids)), ids].sum())

    def teacher_forced_top1(self, image: Image.Image, question: str, token_ids: list[int],
                            system: str | None = None) -> list[int]:
        """For each i, the argmax after prompt + token_ids[:i] (len(token_ids) predictions)."""
        return self.teacher_forced_logits(image, question, token_ids, system).argmax(-1).tolist()
