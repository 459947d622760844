"""The one list of output types imp writes (CLI choices, converter, store and bench read it here).

Kept free of heavy imports: `imp --help` builds its option choices from it.
"""

# Language model: name -> (llama_ftype for llama_model_quantize, bytes per F16 byte, roughly).
TEXT_TYPES = {"Q4_K_M": (15, 0.30), "Q8_0": (7, 0.53), "F16": (1, 1.0)}
# Vision projector: written by gguf/numpy (Q8_0 is bit-exact with llama.cpp's).
MMPROJ_TYPES = ("F16", "Q8_0")
DEFAULT_TEXT_TYPE = "Q4_K_M"
DEFAULT_MMPROJ_TYPE = "F16"
