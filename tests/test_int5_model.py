"""recycore.int5_model: the artifact evaluated with its int5 bank matrices kept packed (K3)
matches the dequantised model; storage, fallbacks, dispatch and clear errors."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, rel_err, write_raw_artifact

from recycore import artifact, ops, quant
from recycore.config import Config
from recycore.int5_codec import pack_int5
from recycore.banks import BANK_NAMES
from recycore.int5_model import DenseMatrix, Int5GPT, load_int5_model, weight_bytes
from recycore.kernels.int5 import Int5Linear
from recycore.model import GPT
from recycore.errors import ArtifactError

# model_dim 272: Q/O (272x272 = 73,984 values), up (408x272) and down (272x408) exceed the seed's
# 65,536-value pass-through limit and go int5, with ragged rows (272, 408: padded to 384, 512);
# K/V (136x272) stay fp16 pass-through (the dense fallback); the 256x272 embedding goes int8.
CFG = Config(vocab_size=256, num_layers=2, model_dim=272, num_heads=4, num_kv_heads=2, mlp_mult=1.5,
             ve_layers=(1,), recycle_layers=(0,), xsa_last_n=1, rope_dims=8, bigram_vocab_size=64, bigram_dim=32,
             ve_dim=32, compile_model=False)
INT5_NAMES = [f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.c_q", "attn.proj", "mlp.fc", "mlp.proj")]
DENSE_NAMES = [f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.c_k", "attn.c_v")]
LAYER_PASSES = 3  # 2 layers + layer 0 recycled once


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random model (the zero-initialised W_o / W_down perturbed) exported with rowmse, whose
    per-row scales use the whole int5 range."""
    torch.manual_seed(0)
    model = GPT(CFG)
    with torch.no_grad():
        model.qo_bank[CFG.num_layers:].normal_(0.0, 0.02)
        model.mlp_down_bank.normal_(0.0, 0.02)
    path = tmp_path_factory.mktemp("int5") / "model.int5.ptz"
    artifact.export_artifact(model.state_dict(), CFG, path, scheme="rowmse")
    return path


@pytest.fixture(scope="module")
def loaded(exported):
    return load_int5_model(exported, device=DEVICE)  # K3 runs natively on a GPU, else interpreted


@pytest.fixture(scope="module")
def dequantised(exported):
    state_dict, cfg, _ = artifact.load_artifact(exported)
    model = GPT(cfg)
    model.load_state_dict(state_dict)
    return model.to(DEVICE).eval(), state_dict


@pytest.fixture(scope="module")
def int5_forward(loaded):
    """One forward of the int5 model on random sequences, recording every int5_linear call
    (out, in, activation) and every F.linear weight's shape."""
    model = loaded[0]
    ids = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    int5_calls, dense_shapes = [], []
    real_int5, real_linear = ops.int5_linear, F.linear

    def record_int5(x, packed, scales, out_features, in_features, activation=None):
        int5_calls.append((out_features, in_features, activation))
        return real_int5(x, packed, scales, out_features, in_features, activation)

    def record_linear(x, w, b=None):
        dense_shapes.append(tuple(w.shape))
        return real_linear(x, w, b)

    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setattr(ops, "int5_linear", record_int5)
        mp.setattr(F, "linear", record_linear)
        logits = model.forward_logits(ids[:, :-1])
    return ids, logits, int5_calls, dense_shapes


def token_loss(logits, ids):
    """GPT.forward's loss from the logits."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)).item()


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------
def test_logits_and_loss_match_dequantised_model(int5_forward, dequantised):
    ids, logits, _, _ = int5_forward
    with torch.inference_mode():
        ref = dequantised[0].forward_logits(ids[:, :-1])
    assert logits.shape == ref.shape == (2, 16, CFG.vocab_size) and logits.dtype == ref.dtype
    assert torch.isfinite(logits).all()
    # The reference rounds q*s to bf16 before its matmul; K3 applies the scale to the fp32 sum.
    assert rel_err(logits, ref) < 2e-2
    loss, ref_loss = token_loss(logits, ids), token_loss(ref, ids)
    assert abs(loss - ref_loss) / ref_loss < 1e-3


def test_packed_matrices_run_on_k3_and_never_dense(int5_forward, loaded):
    _, _, int5_calls, dense_shapes = int5_forward
    model = loaded[0]
    d, mlp = CFG.model_dim, CFG.mlp_dim
    per_pass = [(d, d, None), (d, d, None), (mlp, d, "leaky_relu2"), (d, mlp, None)]  # Q, O, up (+act), down
    assert sorted(int5_calls, key=str) == sorted(per_pass * LAYER_PASSES, key=str)
    packed_shapes = {(p.out_features, p.in_features) for p in model.modules() if isinstance(p, Int5Linear)}
    assert packed_shapes == {(d, d), (mlp, d), (d, mlp)}
    assert not packed_shapes & set(dense_shapes)  # no F.linear on a dequantised copy of a packed matrix
    assert dense_shapes.count((CFG.kv_dim, d)) == 2 * LAYER_PASSES  # K, V: the dense fallback


def test_model_holds_packed_matrices_and_no_banks(loaded):
    model, _, info = loaded
    assert isinstance(model, Int5GPT) and not model.training
    assert info["int5_matrices"] == len(INT5_NAMES) and info["dense_matrices"] == len(DENSE_NAMES)
    for bank in BANK_NAMES:
        assert not hasattr(model, bank)
    for name in INT5_NAMES:
        module = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, Int5Linear)
        assert module.packed.dtype == torch.int32 and module.scales.dtype == torch.float16
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    packed_shapes = {(p.out_features, p.in_features) for p in model.modules() if isinstance(p, Int5Linear)}
    dense = [n for n, t in tensors.items() if t.is_floating_point() and tuple(t.shape) in packed_shapes]
    assert dense == []
    assert not any(t.is_meta or t.requires_grad for t in tensors.values())


def test_weight_bytes_is_five_bits_per_weight_plus_row_padding(loaded):
    model = loaded[0]
    sizes = weight_bytes(model)
    packed = [p for p in model.modules() if isinstance(p, Int5Linear)]
    padded = sum(p.out_features * -(-p.in_features // 128) * 128 for p in packed)
    values = sum(p.out_features * p.in_features for p in packed)
    assert sizes["int5_values"] == values
    assert sizes["int5_words"] * 8 == 5 * padded
    assert sizes["int5_scales"] == 2 * sum(p.out_features for p in packed)
    assert sizes["int5_bits_per_weight"] == pytest.approx(5 * padded / values)
    tensors = list(model.parameters()) + list(model.buffers())
    assert sizes["total"] == sum(t.numel() * t.element_size() for t in tensors)
    assert sizes["other"] == sizes["total"] - sizes["int5_words"] - sizes["int5_scales"]
    assert sizes["dequantised_fp32"] == sizes["other"] + 4 * values
    assert sizes["dequantised_bf16"] == sizes["other"] + 2 * values
    assert sizes["total"] < sizes["dequantised_bf16"] < sizes["dequantised_fp32"]


def test_packed_weight_is_exactly_five_bits_on_whole_groups():
    q = torch.randint(-15, 16, (6, 256), dtype=torch.int8)
    weight = Int5Linear.from_artifact(pack_int5(q), torch.rand(6).half() + 0.1, (6, 256))
    assert weight.packed.numel() * 32 == 5 * q.numel()
    assert {name for name, _ in weight.named_buffers()} == {"packed", "scales"}
    moved = torch.nn.Sequential(weight).to("meta")  # buffers: .to(device) moves them
    assert moved[0].packed.is_meta and moved[0].scales.is_meta


def test_other_tensors_are_load_artifacts(loaded, dequantised):
    """Everything but the packed matrices is what load_artifact gives: K/V dense (fp32, as in the
    banks), the int8 embedding dequantised to bf16, the control tensors."""
    model = loaded[0]
    flat = quant.unbank_state_dict(dequantised[1], CFG.num_layers)
    state = {name: t.cpu() for name, t in model.state_dict().items()}
    for name in DENSE_NAMES:
        assert isinstance(model.get_submodule(name.removesuffix(".weight")), DenseMatrix)
    assert state["tok_emb.weight"].dtype == torch.bfloat16
    assert loaded[2]["formats"]["tok_emb.weight"] == {"type": quant.INT8}
    expected = {name: t for name, t in flat.items() if name not in INT5_NAMES}
    assert set(state) - {n for n in state if n.endswith((".packed", ".scales"))} == set(expected)
    for name, t in expected.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
def _drop(w, key):
    del w[key]


def _truncate(w, key):
    w[key] = w[key][:-5]


def _code_31(w, key):
    w[key] = w[key].clone()
    w[key][:5] = 0xFF  # eight codes of 31


def _reshape(w, key):
    w[key] = torch.tensor([272, 271], dtype=torch.int32)


def _short_scale(w, key):
    w[key] = w[key][:-1]


def _extend(w, key):
    w[key] = torch.cat([w[key], w[key][:5]])


def _last_code_31(w, key):
    w[key] = w[key].clone()
    w[key][-1] |= 0xF8  # value 7 of the last 40-bit word: 408 * 272 values fill whole words


def _as_int8(w, key):
    w[key] = w[key].to(torch.int8)


def _as_2d(w, key):
    w[key] = w[key].view(5, -1)


def _long_scale(w, key):
    w[key] = torch.cat([w[key], w[key][:1]])


def _column_scale(w, key):
    w[key] = w[key][:, None]


def _int_scale(w, key):
    w[key] = torch.ones(w[key].shape, dtype=torch.int16)


@pytest.mark.parametrize("suffix, corrupt, message", [
    (".q", _drop, r"lacks tensor blocks\.0\.mlp\.fc\.weight\.q"),
    (".q", _truncate, r"blocks\.0\.mlp\.fc\.weight: int5 data .* must be \d+ uint8 bytes"),
    (".q", _extend, r"blocks\.0\.mlp\.fc\.weight: int5 data .* must be 69360 uint8 bytes, got 69365"),
    (".q", _code_31, r"blocks\.0\.mlp\.fc\.weight: .*code 31"),
    (".q", _last_code_31, r"blocks\.0\.mlp\.fc\.weight: .*code 31"),
    (".q", _as_int8, r"blocks\.0\.mlp\.fc\.weight: .*1-D uint8"),
    (".q", _as_2d, r"blocks\.0\.mlp\.fc\.weight: .*1-D uint8"),
    (".shape", _reshape, r"blocks\.0\.mlp\.fc\.weight has shape \(272, 271\) .* expects \(408, 272\)"),
    (".scale", _short_scale, r"blocks\.0\.mlp\.fc\.weight\.scale must hold 408"),
    (".scale", _long_scale, r"blocks\.0\.mlp\.fc\.weight\.scale must hold 408 .* shape \(409,\)"),
    (".scale", _column_scale, r"blocks\.0\.mlp\.fc\.weight\.scale must hold 408 .* shape \(408, 1\)"),
    (".scale", _int_scale, r"blocks\.0\.mlp\.fc\.weight\.scale must hold 408 float scales"),
])
def test_corrupt_int5_matrix_is_a_clear_error(exported, tmp_path, suffix, corrupt, message):
    obj = artifact.read_artifact(exported)
    corrupt(obj["w"], "blocks.0.mlp.fc.weight" + suffix)
    path = write_raw_artifact(tmp_path / "bad.ptz", obj)
    with pytest.raises(ArtifactError, match=message):
        load_int5_model(path)


def test_missing_format_entry_and_file_are_clear_errors(exported, tmp_path):
    obj = artifact.read_artifact(exported)
    del obj["m"]["blocks.1.attn.proj.weight"]
    with pytest.raises(ArtifactError, match=r"lacks tensor blocks\.1\.attn\.proj\.weight"):
        load_int5_model(write_raw_artifact(tmp_path / "bad.ptz", obj))
    with pytest.raises(FileNotFoundError):
        load_int5_model(tmp_path / "absent.ptz")



def test_int5_matmuls_follow_autocast(loaded):
    """Under autocast (as evaluation runs) a packed matrix gets its activations in the autocast
    dtype, as F.linear would: autocast does not cast a custom op's inputs, and on CUDA the RMSNorm
    outputs feeding the projections are fp32 (autocast's fp32 list), which ran K3 in fp32."""
    model = loaded[0]
    fc, proj = model.blocks[0].mlp.fc, model.blocks[0].mlp.proj
    x = torch.randn(5, fc.in_features, device=DEVICE)  # fp32, as an RMSNorm output under autocast
    dtypes = []
    real_int5 = ops.int5_linear

    def record_int5(x, *args, **kwargs):
        dtypes.append(x.dtype)
        return real_int5(x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setattr(ops, "int5_linear", record_int5)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y = ops.linear(x, fc)
            mlp = ops.leaky_relu2_mlp(x, fc, proj, "auto")
        assert y.dtype == mlp.dtype == torch.bfloat16 and dtypes == [torch.bfloat16] * 3
        dtypes.clear()
        assert ops.linear(x, fc).dtype == torch.float32 and dtypes == [torch.float32]  # no autocast: as given


# ---------------------------------------------------------------------------
# The weights are never expanded
# ---------------------------------------------------------------------------
def _count_decoder_calls(mp):
    """Wrap K3's decoder (the only code that turns packed words into a dense matrix) to count calls."""
    from recycore.kernels import int5 as int5_kernels

    calls = []
    real = int5_kernels._dequantize
    mp.setattr(int5_kernels, "_dequantize", lambda *args: calls.append(args[2:4]) or real(*args))
    mp.setattr(int5_kernels, "dequantize", lambda *args, **kw: calls.append(args[2:4]) or real(*args[:4]))
    return calls


@pytest.mark.parametrize("rows", [32, 65])  # the small-M and the large-M kernels
def test_forward_never_decodes_a_packed_matrix(loaded, rows):
    model = loaded[0]
    ids = torch.randint(0, CFG.vocab_size, (1, rows), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        calls = _count_decoder_calls(mp)
        logits = model.forward_logits(ids)
    assert calls == [] and torch.isfinite(logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch, seq", [(32, 2048), (1, 32)], ids=["65536_rows", "32_rows"])
def test_gpu_eval_makes_no_dense_weight(loaded, batch, seq):
    """The int5-direct evaluation forward (autocast bf16, as `recycore eval` runs it) at 65,536 and
    at 32 rows: the decoder is never called and no allocation has the size of a packed matrix in
    bf16 or fp32 (the caching allocator's sizes, from a memory-history snapshot)."""
    model = loaded[0]
    ids = torch.randint(0, CFG.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model.forward_logits(ids)

    forward()  # compile outside the recorded region
    torch.cuda.synchronize()
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_decoder_calls(mp)
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        try:
            logits = forward()
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
    assert calls == [] and torch.isfinite(logits.float()).all()
    sizes = {e["size"] for trace in snapshot["device_traces"] for e in trace if e["action"] == "alloc"}
    packed = [p for p in model.modules() if isinstance(p, Int5Linear)]
    dense = {-(-p.out_features * p.in_features * b // 512) * 512 for p in packed for b in (2, 4)}
    assert sizes and not dense & {-(-n // 512) * 512 for n in sizes}
