"""The four weight banks (one home for their layout).

GPT keeps the attention and MLP matrices of all layers in four 3-D parameters, the "banks", which Muon
orthogonalises matrix by matrix; the artifact stores them un-banked, one matrix per layer under the
seed's names. qo = [Q_0..Q_{L-1}, O_0..O_{L-1}], kv = [K_0..K_{L-1}, V_0..V_{L-1}], up, down."""
from __future__ import annotations

BANK_NAMES = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
# One layer's matrices in GPT.bank_weights order, under the seed's un-banked module names.
LAYER_MATRICES = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")


def layer_slots(num_layers: int, layer: int) -> tuple[tuple[str, int], ...]:
    """(bank, index) of each of LAYER_MATRICES for physical layer `layer`."""
    L = num_layers
    return (("qo_bank", layer), ("kv_bank", layer), ("kv_bank", L + layer), ("qo_bank", L + layer),
            ("mlp_up_bank", layer), ("mlp_down_bank", layer))


def bank_shapes(num_layers: int, model_dim: int, kv_dim: int, mlp_dim: int) -> dict[str, tuple[int, int, int]]:
    L, d = num_layers, model_dim
    return {"qo_bank": (2 * L, d, d), "kv_bank": (2 * L, kv_dim, d), "mlp_up_bank": (L, mlp_dim, d),
            "mlp_down_bank": (L, d, mlp_dim)}


def matrix_name(layer: int, matrix: str) -> str:
    """The seed's state-dict name of one un-banked matrix, e.g. blocks.3.attn.c_q.weight."""
    return f"blocks.{layer}.{matrix}.weight"


def bank_slices(num_layers: int) -> dict[str, list[tuple[int, str]]]:
    """bank -> [(index in the bank, un-banked name)], layer by layer (the seed's tensor order)."""
    slices: dict[str, list[tuple[int, str]]] = {name: [] for name in BANK_NAMES}
    for layer in range(num_layers):
        for (bank, index), matrix in zip(layer_slots(num_layers, layer), LAYER_MATRICES):
            slices[bank].append((index, matrix_name(layer, matrix)))
    return slices
