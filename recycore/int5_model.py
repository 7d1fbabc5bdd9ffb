"""Evaluating the int5 artifact directly: the bank matrices stay packed (5 bits per weight
+ one fp16 scale per row) on the device, never expanded to bf16/fp32.

`load_int5_model(path)` builds an `Int5GPT`: GPT without its four fp32 banks. Each attention/MLP
matrix the artifact stores as int5 is transcoded once, at load, into K3's GPU layout
(`transcode_artifact`) and held as an `Int5Linear`; `bank_weights` hands these to the usual
dispatch points, which recognise the type and run K3's `int5_linear` on them (the MLP's LeakyReLU²
in the up projection's epilogue). Every other tensor is dequantised by the same
function as `load_artifact` (quant.dequantize_state_dict), so it is identical to the dequantised
model's. Two documented fallbacks keep a dense tensor:
  * a bank matrix the artifact does not store as int5 (the seed passes matrices of <= 65,536
    values through as fp16) is held dense, in the banks' fp32, as the dequantised model holds it;
  * the int8 token embedding / tied head is dequantised to bf16 (the table's dtype in GPT): the
    lookup reads rows and the head is one vocab x d matmul per window, with no int8 kernel here;
    it is small (1024 x 512 in bf16 = 1 MiB).
Eval only: K3 has no backward, and the model's tensors do not require grad.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from torch import Tensor

from recycore import artifact, quant
from recycore.banks import BANK_NAMES, LAYER_MATRICES, matrix_name
from recycore.config import Config
from recycore.errors import ArtifactError
from recycore.kernels.int5 import Int5Linear
from recycore.model import GPT, layer_norm_scale


class DenseMatrix(nn.Module):
    """A bank matrix the artifact does not store as int5: its dequantised weight (buffer `weight`)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)


class Int5GPT(GPT):
    """GPT for evaluation whose bank matrices are modules of the blocks, under the artifact's names
    (blocks.{i}.attn.c_q, .attn.c_k, .attn.c_v, .attn.proj, .mlp.fc, .mlp.proj): Int5Linear,
    or DenseMatrix for a matrix the artifact keeps in another format. There are no banks."""

    def __init__(self, cfg: Config, matrices: dict[str, nn.Module], state_dict: dict[str, Tensor]):
        """matrices: "blocks.{i}.attn.c_q.weight", ... -> its module; state_dict: every other tensor of
        GPT(cfg) (the banks excluded), dequantised."""
        with torch.device("meta"):  # no banks allocated or initialised: every tensor comes from the artifact
            super().__init__(cfg)
        for bank in BANK_NAMES:
            delattr(self, bank)
        self.load_state_dict(state_dict, strict=True, assign=True)
        device = self.tok_emb.weight.device
        for i, block in enumerate(self.blocks):
            block.ln_scale = torch.tensor(layer_norm_scale(cfg, i), device=device)  # not in the state dict
            block.mlp = nn.Module()
        expected = {matrix_name(i, m) for i in range(cfg.num_layers) for m in LAYER_MATRICES}
        if set(matrices) != expected:
            raise ValueError(f"matrices must be exactly the {len(expected)} bank matrices of the config's model; "
                             f"missing {sorted(expected - set(matrices))[:3]}, "
                             f"unexpected {sorted(set(matrices) - expected)[:3]}")
        for name, module in matrices.items():
            parent, _, leaf = name.removesuffix(".weight").rpartition(".")
            setattr(self.get_submodule(parent), leaf, module)
        self.requires_grad_(False)
        self.eval()

    def bank_weights(self, layer: int) -> tuple[Tensor | Int5Linear, ...]:
        """(W_q, W_k, W_v, W_o, W_up, W_down) of physical layer `layer`: packed, or dense tensors."""
        block = self.blocks[layer]
        return tuple(_operand(block.get_submodule(m)) for m in LAYER_MATRICES)


def _operand(module: nn.Module) -> Tensor | Int5Linear:
    return module.weight if isinstance(module, DenseMatrix) else module


def _is_int5(fmt) -> bool:
    return isinstance(fmt, dict) and fmt.get("type") == quant.INT5_PACKED


def _packed_matrix(name: str, w: dict, shape: tuple[int, int], device) -> Int5Linear:
    """The artifact's int5 entry `name` (.q bytes, .scale, .shape), checked against the model's
    shape and transcoded on `device`."""
    def get(key: str) -> Tensor:
        if not isinstance(w.get(key), Tensor):
            raise ArtifactError(f"artifact lacks tensor {key} (int5 matrix {name})")
        return w[key]

    stored = tuple(int(n) for n in get(name + ".shape").flatten().tolist())
    if stored != shape:
        raise ArtifactError(f"tensor {name} has shape {stored} in the artifact but the config's model expects "
                            f"{shape}; does the config match the artifact?")
    scale = get(name + ".scale")
    if not scale.is_floating_point() or tuple(scale.shape) != shape[:1]:
        raise ArtifactError(f"{name}.scale must hold {shape[0]} float scales (one per row), "
                            f"got {scale.dtype} of shape {tuple(scale.shape)}")
    try:
        return Int5Linear.from_artifact(get(name + ".q").to(device), scale.to(device), shape)
    except (TypeError, ValueError) as exc:  # wrong byte count or dtype, codes above 30
        raise ArtifactError(f"int5 matrix {name}: {exc}") from None


def load_int5_model(path, cfg: Config | None = None, device="cpu") -> tuple[Int5GPT, Config, dict]:
    """-> (Int5GPT on `device`, in eval mode, cfg, info): load_artifact's info (its evaluation record
    included) plus int5_matrices / dense_matrices (how many bank matrices are packed / kept dense)."""
    device = torch.device(device)
    obj = artifact.read_artifact(path)
    cfg = artifact.artifact_config(obj, cfg)
    template = quant.unbank_state_dict(artifact.model_template(cfg), cfg.num_layers)
    w, m = obj["w"], obj["m"]
    names = [matrix_name(i, matrix) for i in range(cfg.num_layers) for matrix in LAYER_MATRICES]
    packed = [name for name in names if _is_int5(m.get(name))]
    try:
        flat = quant.dequantize_state_dict(w, {k: v for k, v in m.items() if k not in packed},
                                           {k: v for k, v in template.items() if k not in packed})
        matrices = {name: _packed_matrix(name, w, tuple(template[name].shape), device) for name in packed}
    except ArtifactError as exc:
        raise ArtifactError(f"artifact {path}: {exc}") from None
    matrices.update((name, DenseMatrix(flat.pop(name))) for name in names if name not in packed)
    model = Int5GPT(cfg, matrices, flat).to(device)
    info = {**artifact.artifact_info(obj, path), "int5_matrices": len(packed), "dense_matrices": len(names) - len(packed)}
    return model, cfg, info


def weight_bytes(model: nn.Module) -> dict[str, int | float]:
    """Bytes the model's weights (parameters and buffers) hold, and what the dequantised eval
    model (GPT with fp32 banks, from load_artifact) would hold for the same packed matrices:
      total: all weights; int5_words / int5_scales: the packed matrices' words and fp16 scales;
      int5_values: their weights; int5_bits_per_weight: 8 * int5_words / int5_values (5, plus the
      padding of rows to 128 values); other: everything else;
      dequantised_fp32 / dequantised_bf16: other + the packed matrices in fp32 (as GPT holds its
      banks) / in bf16."""
    packed = [module for module in model.modules() if isinstance(module, Int5Linear)]
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}  # tied tensors once
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    words = sum(p.packed.numel() * p.packed.element_size() for p in packed)
    scales = sum(p.scales.numel() * p.scales.element_size() for p in packed)
    values = sum(p.out_features * p.in_features for p in packed)
    other = total - words - scales
    return {"total": total, "int5_words": words, "int5_scales": scales, "int5_values": values,
            "int5_bits_per_weight": 8 * words / values if values else 0.0, "other": other,
            "dequantised_fp32": other + 4 * values, "dequantised_bf16": other + 2 * values}
