"""CUDA-graph capture (recycore.graphs.Captured) and the training step built on it (recycore.step): on the
CPU everything runs eagerly and unchanged; on a GPU a replayed step computes what the eager step
computes, schedule values change between replays, and a capture that fails falls back with one warning."""
import pytest
import torch
from helpers import requires_cuda

from recycore.checkpoint import WeightAverages
from recycore.config import PRESETS, Config
from recycore.graphs import Captured, relative_check
from recycore.model import GPT
from recycore.optim import Muon, OptimizerSet
from recycore.step import TrainStep

TINY = dict(PRESETS["ci"], num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, rope_dims=8, recycle_layers=(0,),
            ve_layers=(1,), xsa_last_n=1, bigram_vocab_size=64, bigram_dim=16, ve_dim=16, vocab_size=128,
            train_seq_len=32)


def test_captured_runs_eagerly_on_the_cpu():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    f = Captured(fn, "double")
    x = torch.arange(4.0)
    for _ in range(3):
        assert torch.equal(f(x), x * 2)
    assert len(calls) == 3 and f.captured == 0


def _muon_steps(lr, momentum, steps=2):
    torch.manual_seed(0)
    banks = [torch.randn(3, 16, 24) for _ in range(2)]
    grads = [torch.randn_like(b) for b in banks]
    params = [b.clone().requires_grad_() for b in banks]
    muon = Muon(params, lr=0.02, momentum=0.9, weight_decay=0.04)
    for group in muon.param_groups:
        group["lr"], group["momentum"] = lr, momentum
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        muon.step()
    return [p.detach() for p in params], banks


def test_muon_takes_schedule_values_as_tensors():
    """The captured optimiser step reads its learning rate and momentum from 0-dim tensors (fp32 math)
    and moves the weights as the Python numbers do (the seed's ops, which round the momentum buffer to
    bf16 twice); the bf16 Newton-Schulz iteration turns those roundings into a few percent of the
    update, while another learning rate moves them clearly elsewhere."""
    floats, start = _muon_steps(0.03, 0.95)
    tensors, _ = _muon_steps(torch.tensor(0.03), torch.tensor(0.95))
    other_lr, _ = _muon_steps(torch.tensor(0.02), torch.tensor(0.95))
    for a, b, c, s in zip(floats, tensors, other_lr, start):
        moved = (a - s).norm()
        assert moved > 0.1 and (a - b).norm() / moved < 5e-2 and (a - c).norm() / moved > 0.2


def test_optimizer_restore_gives_a_fresh_optimizer():
    """The warm-up's in-place restore: state made since the snapshot is zeroed (what a fresh optimiser
    holds), so the next steps equal those of a new optimiser."""
    cfg = Config(**TINY)
    torch.manual_seed(0)
    model = GPT(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, cfg.vocab_size, (2, 32))

    def steps(opt, n):
        losses = []
        for _ in range(n):
            opt.zero_grad()
            loss = model(x, x)
            loss.backward()
            opt.set_schedule(1.0, 0.95)
            opt.step()
            losses.append(loss.item())
        return losses

    opt = OptimizerSet(model, cfg)
    snapshot = opt.snapshot()
    steps(opt, 2)
    model.load_state_dict(start)
    opt.restore(snapshot)
    again = steps(opt, 3)
    model.load_state_dict(start)
    fresh = steps(OptimizerSet(model, cfg), 3)
    assert again == fresh


# ---------------------------------------------------------------------------
@requires_cuda
def test_a_capture_that_fails_falls_back_with_one_warning():
    lines = []

    def syncs(x):  # .item() cannot be captured
        return x * float(x.sum().item())

    f = Captured(syncs, "syncing op", log=lines.append)
    x = torch.ones(8, device="cuda")
    for _ in range(4):
        assert torch.equal(f(x), x * 8.0)
    assert f.captured == 0 and len(lines) == 1 and "capture failed" in lines[0] and "syncing op" in lines[0]


@requires_cuda
def test_a_replay_that_differs_is_caught():
    state = {"n": 0}

    def drifting(x):  # a Python-side value baked into the capture: its replay goes stale
        state["n"] += 1
        return x * state["n"]

    lines = []
    f = Captured(drifting, "drifting op", log=lines.append, check=relative_check(1e-6))
    x = torch.ones(4, device="cuda")
    f(x)
    f(x)  # captures (n = 2 baked in), runs eagerly (n = 3), compares
    assert f.captured == 0 and "differs" in lines[0]


@requires_cuda
def test_a_non_finite_loss_shows_through_the_replayed_step():
    """The loss a replay returns is that replay's: a NaN that reaches a weight between steps is in the next
    loss, for training to stop on (tests/test_reliability.py, on the CPU, checks the stop itself)."""
    cfg = Config(**{**TINY, "kernels": "fused", "train_batch_tokens": 2 * 2 * 32})
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    opt = OptimizerSet(model, cfg, capturable=True)
    step = TrainStep(model, model, opt, WeightAverages(model, 0.9), torch.device("cuda"), graphs=True)
    micro = [(torch.randint(0, cfg.vocab_size, (2, 32), device="cuda"),) * 2 for _ in range(2)]
    for _ in range(3):
        loss, grad_sq = step.forward_backward(micro)
        step.update()
        assert torch.isfinite(loss) and torch.isfinite(grad_sq)
    assert step.captured == 2
    with torch.no_grad():
        model.tok_emb.weight.fill_(float("nan"))
    loss, grad_sq = step.forward_backward(micro)
    assert step.captured == 2 and not torch.isfinite(loss)


@requires_cuda
@pytest.mark.parametrize("kernels,attention_impl", [("reference", None), ("fused", "triton"),
                                                    ("fused", "triton_one_pass"), ("fused", "sdpa_fused")])
def test_graphed_steps_match_eager_steps(kernels, attention_impl, monkeypatch):
    """Five training steps with a changing schedule and late QAT switching on: the graphed step
    (forward+backward and optimiser step replayed) gives the eager step's losses and weights. Both
    keep the schedule in device tensors (capturable=True: Muon's fp32 arithmetic), so only the
    capture differs; the uncaptured training path's float schedule (the seed's bf16 ops) is
    compared with the graphed one over 200 steps (benchmarks/README.md, loss match). Fused, with each
    fused attention implementation (auto's choices and the one-pass backward)."""
    from recycore.kernels import attention as attn

    if attention_impl:
        monkeypatch.setattr(attn, "choose_impl", lambda *args: attention_impl)
    cfg = Config(**{**TINY, "kernels": kernels, "train_batch_tokens": 4 * 2 * 32})
    torch.manual_seed(0)
    batches = [[(torch.randint(0, cfg.vocab_size, (2, 32), device="cuda"),) * 2 for _ in range(4)] for _ in range(5)]
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg).cuda()
        opt = OptimizerSet(model, cfg, capturable=True)
        averages = WeightAverages(model, 0.9)
        step = TrainStep(model, model, opt, averages, torch.device("cuda"), graphs=graphs)
        losses = []
        for i, micro in enumerate(batches):
            model.set_qat(i >= 3)
            loss, grad_sq = step.forward_backward(micro)
            opt.set_schedule(1.0 - 0.1 * i, 0.9 + 0.01 * i)
            step.update()
            losses.append(loss.item())
        runs.append((losses, {k: v.float().clone() for k, v in model.state_dict().items()}, step.captured))
    (eager_losses, eager_state, _), (graph_losses, graph_state, captured) = runs
    assert captured == 3  # forward+backward without and with QAT, the optimiser step
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    for name, tensor in eager_state.items():
        err = (graph_state[name] - tensor).norm() / tensor.norm().clamp_min(1e-12)
        assert err < 1e-3, name
