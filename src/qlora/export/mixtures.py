"""Which GGML type each tensor gets, per file type: llama.cpp's mixtures, written from its rules.

llama.cpp's `llama-quantize` does not store every tensor of a Q4_K_M file in Q4_K: tensors whose
errors cost more get more bits. These are its rules (src/llama-quant.cpp, llama_tensor_get_type)
for the file types we write and the models we export (not Falcon), dense:

  file type  default  output*  attn_v                        ffn_down                  attn_output
  q2_k       Q2_K     Q6_K     Q3_K (Q4_K when n_gqa ≥ 4)    Q3_K                      Q3_K
  q3_k_m     Q3_K     Q6_K     Q5_K in layers 0-1, else Q4_K Q5_K in the first 1/16,   Q4_K
                                                             else Q4_K
  q4_k_s     Q4_K     Q6_K     Q5_K in layers 0-3            Q5_K in the first 1/8     -
  q4_k_m     Q4_K     Q6_K     Q6_K where use_more_bits      Q6_K where use_more_bits  -
  q5_k_s     Q5_K     Q6_K     -                             -                         -
  q5_k_m     Q5_K     Q6_K     Q6_K where use_more_bits      Q6_K where use_more_bits  -
  q6_k       Q6_K     Q6_K     -                             -                         -
  q4_0       Q4_0     Q6_K     -                             -                         -
  q8_0       Q8_0     Q8_0     -                             -                         -

  * output.weight, or token_embd.weight when the output is tied to it (the one tensor is both).
    An untied token_embd keeps the default type. attn_q, attn_k, ffn_gate, ffn_up: the default.
    A fused attn_qkv (Phi-3) takes attn_v's rules.
  use_more_bits(i, n): the first and last eighth of the layers and every third one in between.
  A 70B-class model (llama.cpp's LLM_TYPE_70B: llama with 80 layers and grouped KV heads, qwen2
  with 80 layers; no other architecture we write has one) stores a Q3_K / Q4_K attn_v as Q5_K:
  its attn_v is 8× smaller than attn_q.

llama.cpp counts attn_v / ffn_down tensors in its layer-sorted tensor order; for a dense model that
count is the layer number in the tensor's name, which is what we read (as llama.cpp does for a
mixture of experts).

A mixture of experts (n_expert > 1) follows the same rules, its stacked experts [E, out, in] by
their roles: ffn_down_exps as ffn_down, ffn_gate_exps / ffn_up_exps as ffn_gate / ffn_up (the
default). An 8-expert model (Mixtral) adds three: attn_k and attn_v in Q8_0 for every quantized
file type, and attn_output in Q5_K for q2_k, q3_k_m, q4_k_s and q4_k_m (its other file types keep
the default, not the dense rule). The router (ffn_gate_inp) is never quantized: F32.

Row widths: a k-quant block holds 256 values of one row, Q4_0 / Q8_0 blocks 32. A tensor whose rows
do not fill whole blocks falls back as llama.cpp does: output to Q8_0; Q2_K, Q3_K → Q4_0; Q4_K →
Q5_0; Q5_K → Q5_1; Q6_K → Q8_0; and to F16 when even that block (32) does not divide the row.
1-D tensors (norms, biases, rope factors) stay F32; f16 / bf16 files store every 2-D tensor as such.
GPT-2's learned position table (position_embd) is never quantized: F32, as the router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# file type → (the type most tensors get, gguf LlamaFileType member name)
FILE_TYPES = {
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q2_k": ("Q2_K", "MOSTLY_Q2_K"),
    "q3_k_m": ("Q3_K", "MOSTLY_Q3_K_M"),
    "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
}
K_QUANT_FILES = tuple(name for name, (base, _) in FILE_TYPES.items() if base.endswith("_K"))
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
         **{k: 256 for k in K_TYPES}}
# a row that does not fill whole blocks of the type on the left is stored in the type on the right
SHAPE_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
                  "Q4_0": "F16", "Q5_0": "F16", "Q5_1": "F16", "Q8_0": "F16"}


@dataclass(frozen=True)
class Model:
    """What the rules read about the model."""

    n_layer: int
    n_head: int
    n_kv_head: int
    has_output: bool  # an output.weight of its own (untied)
    n_expert: int = 0  # a mixture of experts' experts a layer; 0 for a dense model
    arch: str = "llama"  # the GGUF architecture (llama.cpp names a 70B-class model per architecture)

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(1, self.n_kv_head)

    @property
    def is_70b_class(self) -> bool:
        if self.arch == "llama":  # 80 layers without grouped KV heads: its 65B
            return self.n_layer == 80 and self.n_head != self.n_kv_head
        return self.arch == "qwen2" and self.n_layer == 80


@dataclass(frozen=True)
class Choice:
    """The type a tensor is stored in, and the one its role asked for (they differ on fallback)."""

    stored: str
    wanted: str


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's layers that get more bits in the _M mixtures: the first and last eighth, and
    every third layer in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def role_of(name: str) -> tuple[str, int | None]:
    """('attn_v', 3) for blk.3.attn_v.weight, ('output', None) for output.weight."""
    m = re.match(r"blk\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m:
        return m.group(2), int(m.group(1))
    return name.rsplit(".", 1)[0], None


def wanted_type(name: str, file_type: str, model: Model) -> str:
    """The GGML type (name) llama.cpp's mixture gives a 2-D tensor of this file type."""
    default = FILE_TYPES[file_type][0]
    if default in ("F16", "BF16"):
        return default
    role, layer = role_of(name)
    if role == "output" or (role == "token_embd" and not model.has_output):
        return "Q8_0" if default == "Q8_0" else "Q6_K"
    if role == "attn_k" and model.n_expert == 8:
        return "Q8_0"  # llama.cpp: "bumping this to Q8_0 trades just ~128MB" at 8 experts
    if role in ("attn_v", "attn_qkv"):  # llama.cpp's rules for v hold for a fused qkv (Phi-3)
        return "Q8_0" if model.n_expert == 8 else _attn_v(file_type, default, layer, model)
    if role in ("ffn_down", "ffn_down_exps"):
        return _ffn_down(file_type, default, layer, model)
    if role == "attn_output" and model.n_expert == 8:
        return "Q5_K" if file_type in ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m") else default
    if role == "attn_output":
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K"}.get(file_type, default)
    return default


def _attn_v(file_type: str, default: str, layer: int, model: Model) -> str:
    chosen = default
    if file_type == "q2_k":
        chosen = "Q4_K" if model.n_gqa >= 4 else "Q3_K"
    elif file_type == "q3_k_m":
        chosen = "Q5_K" if layer < 2 else "Q4_K"
    elif file_type in ("q4_k_m", "q5_k_m") and use_more_bits(layer, model.n_layer):
        chosen = "Q6_K"
    elif file_type == "q4_k_s" and layer < 4:
        chosen = "Q5_K"
    if model.is_70b_class and chosen in ("Q3_K", "Q4_K"):
        chosen = "Q5_K"
    return chosen


def _ffn_down(file_type: str, default: str, layer: int, model: Model) -> str:
    n = model.n_layer
    if file_type == "q2_k":
        return "Q3_K"
    if file_type == "q3_k_m":
        return "Q5_K" if layer < n // 16 else "Q4_K"
    if file_type in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n):
        return "Q6_K"
    if file_type == "q4_k_s" and layer < n // 8:
        return "Q5_K"
    return default


def tensor_type(name: str, shape: tuple[int, ...], file_type: str, model: Model) -> Choice:
    """The type `name` (llama.cpp's tensor name) of `shape` is stored in, in a `file_type` file."""
    if len(shape) < 2:
        return Choice("F32", "F32")
    if role_of(name)[0] == "position_embd":  # llama.cpp's converter and quantizer: F32
        return Choice("F32", "F32")
    wanted = wanted_type(name, file_type, model)
    stored = wanted
    role, _ = role_of(name)
    if shape[-1] % BLOCK[stored] and (role == "output" or (role == "token_embd" and not model.has_output)):
        stored = "Q8_0"  # llama.cpp's own rule for the output tensor, before the general one
    while shape[-1] % BLOCK[stored]:
        stored = SHAPE_FALLBACK[stored]
    return Choice(stored, wanted)
