"""CPU tests of the benchmark tooling: the report, the profiler's kernel families, the copy finder."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from recycore.bench import kernel_family, kernel_traffic, pure_copy_kernels

REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"


@pytest.mark.parametrize("name, family", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "attention"),
    ("_attn_fwd_kernel", "attention"),
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopB_TNN", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"),
    ("triton_poi_fused__to_copy_add_mul_0", "elementwise/norm"),
    ("triton_red_fused__fused_rms_norm_backward_3", "elementwise/norm"),
    ("void at::native::multi_tensor_apply_kernel<...FusedAdamMathFunctor...>", "optimizer"),
    ("ncclDevKernel_AllGather_RING_LL", "other"),
])
def test_kernel_families(name, family):
    assert kernel_family(name) == family


def _inductor_kernel(name: str, body: str) -> str:
    """A kernel as inductor's generated module holds it (the source string of an async_compile.triton call)."""
    return (f"{name} = async_compile.triton('{name}', '''\n@triton.jit\n"
            f"def {name}(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):\n{body}''', device_str='cuda')\n")


def test_pure_copy_kernels_names_only_the_kernels_that_move_data_unchanged():
    index = "    xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)[:]\n    x0 = xindex % 1032\n"
    code = "\n".join([
        _inductor_kernel("triton_poi_fused_copy_0", index + "    tmp0 = tl.load(in_ptr0 + (x0 + 1088*(xindex // 1032)), "
                         "None).to(tl.float32)\n    tl.store(out_ptr0 + (xindex), tmp0, None)\n"),
        _inductor_kernel("triton_poi_fused_mul_1", index + "    tmp0 = tl.load(in_ptr0 + (xindex), None)\n"
                         "    tmp1 = tmp0 * tmp0\n    tl.store(out_ptr0 + (xindex), tmp1, None)\n"),
        _inductor_kernel("triton_poi_fused_add_2", index + "    tmp0 = tl.load(in_ptr0 + (xindex), None)\n"
                         "    tmp1 = tl.load(in_ptr0 + (xindex + 1), None)\n    tmp2 = tmp0 + tmp1\n"
                         "    tl.store(out_ptr0 + (xindex), tmp2, None)\n"),
    ])
    assert pure_copy_kernels(code) == ["triton_poi_fused_copy_0"]


def test_kernel_traffic_weighs_each_kernel_by_its_launches():
    """Inductor's per-kernel traffic estimate (its tiling scores, from the kernel's inductor_meta) times the
    launches in the graph's `call`; a defined kernel that is never launched is not listed."""
    def meta(name, scores):
        return (f"@triton_heuristics.pointwise(size_hints={{'x': 1024}}, filename=__file__,\n"
                f"    inductor_meta={{'grid_type': 'Grid1D', 'kernel_name': '{name}', 'num_load': 2, "
                f"'tiling_scores': {scores}}},\n)\n")
    code = "\n".join([
        meta("triton_poi_fused_add_0", "{'x': 3000}") + _inductor_kernel("triton_poi_fused_add_0", "    pass\n"),
        meta("triton_red_fused_sum_1", "{'x': 100, 'r0_': 4e3}") + _inductor_kernel("triton_red_fused_sum_1", "    pass\n"),
        meta("triton_poi_fused_unused_2", "{'x': 9e9}") + _inductor_kernel("triton_poi_fused_unused_2", "    pass\n"),
        "class Runner:\n    def call(self, args):\n"
        "        triton_red_fused_sum_1.run(buf0, buf1, 8, stream=stream0)\n"
        "        triton_poi_fused_add_0.run(buf1, buf2, 8, stream=stream0)\n"
        "        triton_red_fused_sum_1.run(buf2, buf3, 8, stream=stream0)\n",
    ])
    assert kernel_traffic(code) == [("triton_red_fused_sum_1", 2, 8200.0), ("triton_poi_fused_add_0", 1, 3000.0)]


def test_report_table_and_speedups(tmp_path):
    bench = {"datetime": "2026-11-28T12:00:00", "machine_info": {"python_version": "3.12"}, "benchmarks": [
        {"name": "a", "extra_info": {"group": "g", "label": "base", "ms": 2.0, "tflops": 100.0, "baseline": True,
                                     "gpu": "NVIDIA H200", "torch": "2.11"}},
        {"name": "b", "extra_info": {"group": "g", "label": "ours", "ms": 1.6, "tflops": 125.0,
                                     "gpu": "NVIDIA H200", "torch": "2.11"}},
        {"name": "skipped", "extra_info": {}},
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(bench))
    out = subprocess.run([sys.executable, str(REPORT), str(path)], capture_output=True, text=True, check=True)
    table = (tmp_path / "r.md").read_text()
    assert (tmp_path / "r_00.png").exists()
    assert "| g | ours | 1.600 | 125 |  |  | 1.25x |" in table and "NVIDIA H200" in table
    assert "table" not in out.stderr.lower()


def test_report_merges_runs(tmp_path):
    """Parts of the suite run on different GPUs merge into one table; groups keep their baselines."""
    def run(label, ms, baseline, **extra):
        return {"name": label, "extra_info": {"group": "g", "label": label, "ms": ms, "baseline": baseline, **extra}}

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"datetime": "2026-11-28", "benchmarks": [run("base", 3.0, True)]}))
    second.write_text(json.dumps({"benchmarks": [run("ours", 2.0, False, tokens_per_s=12345.6)]}))
    subprocess.run([sys.executable, str(REPORT), str(first), str(second), "--name", "merged"],
                   capture_output=True, text=True, check=True)
    table = (tmp_path / "merged.md").read_text()
    assert "| g | ours | 2.000 |  |  | 12,346 | 1.50x |" in table


def test_report_refuses_empty_results(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": [{"name": "x", "extra_info": {}}]}))
    result = subprocess.run([sys.executable, str(REPORT), str(path)], capture_output=True, text=True)
    assert result.returncode != 0 and "no benchmark figures" in result.stderr


def test_report_baseline_label_for_unflagged_groups(tmp_path):
    path = tmp_path / "r.json"
    rows = [{"name": n, "extra_info": {"group": "k2", "label": n, "ms": ms}} for n, ms in (("ours", 1.0), ("base", 1.5))]
    path.write_text(json.dumps({"benchmarks": rows}))
    subprocess.run([sys.executable, str(REPORT), str(path), "--baseline", "base"], capture_output=True, text=True,
                   check=True)
    table = (tmp_path / "r.md").read_text()
    assert "| k2 | ours | 1.000 |  |  |  | 1.50x |" in table and "| k2 | base (baseline) |" in table


@pytest.mark.parametrize("path", ["reference-max-autotune", "reference-compiled"])
def test_compiled_paths_compute_the_eager_step(path):
    # the per-block layout (blocks, recycle modulations and the loss compiled apart) must be the
    # same function as the eager model: same loss, same gradients (aot_eager: no inductor on CPU)
    import torch

    from recycore.bench import build, random_batch
    from recycore.config import Config
    from recycore.config import PRESETS

    cfg = Config().replace(**PRESETS["ci"])
    x, y = random_batch(cfg, 2, device="cpu")
    torch.manual_seed(0)
    eager, eager_step = build("reference-eager", cfg, device="cpu")
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    compiled, compiled_step = build(path, cfg, device="cpu", backend="aot_eager")
    torch.testing.assert_close(compiled_step(x, y), eager_step(x, y), rtol=1e-5, atol=1e-5)
    # per block: block variants + the recycle modulation + the loss; whole model: one graph
    assert counters["stats"]["unique_graphs"] >= (3 if path == "reference-max-autotune" else 1)
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters()):
        if b.grad is None:  # unused in this config (layer 0's value-residual mix)
            assert a.grad is None, name
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert sum(p.grad is not None for p in compiled.parameters()) > 20


@pytest.mark.parametrize("path,graphs", [("reference-max-autotune", 6), ("reference-max-autotune-whole", 1)])
def test_max_autotune_graphs_of_the_seed_model(path, graphs):
    # compile time of the max-autotune baseline scales with the graphs: per block, the 12 blocks share
    # 4 (layer 0 without the value residual, plain, XSA, XSA + value embeddings), plus the recycle
    # modulation and the head+loss (a per-layer Python constant in Block would make it 12 + 2 again);
    # the whole-model layout is one graph
    import torch
    from torch._dynamo.testing import CompileCounter

    from recycore.bench import build
    from recycore.config import Config

    cfg = Config()
    torch._dynamo.reset()
    counter = CompileCounter()
    _, step = build(path, cfg, device="cpu", backend=counter)
    ids = torch.randint(0, cfg.vocab_size, (1, 33))
    step(ids[:, :-1], ids[:, 1:])
    assert counter.frame_count == graphs


def _archive(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_seed_inductor_cache_adds_decisions_and_keeps_existing_entries(tmp_path, monkeypatch):
    from recycore.bench import seed_inductor_cache

    monkeypatch.delenv("RECYCORE_AUTOTUNE_ARCHIVE", raising=False)
    archive = _archive(tmp_path / "a.tgz", {"./cache/abc123": b"timings", "./ab/cd/k.best_config": b"{}",
                                            "./cache/kept": b"from the archive"})
    cache = tmp_path / "inductor"
    (cache / "cache").mkdir(parents=True)
    (cache / "cache" / "kept").write_bytes(b"local")
    assert seed_inductor_cache(archive, cache) == 2
    assert (cache / "cache" / "abc123").read_bytes() == b"timings"
    assert (cache / "ab" / "cd" / "k.best_config").read_bytes() == b"{}"
    assert (cache / "cache" / "kept").read_bytes() == b"local"
    assert seed_inductor_cache(archive, cache) == 0
    monkeypatch.setenv("RECYCORE_AUTOTUNE_ARCHIVE", "none")
    assert seed_inductor_cache(cache_dir=cache / "other") == 0 and not (cache / "other").exists()


def test_seed_inductor_cache_bad_archives_are_clear_errors(tmp_path):
    from recycore.bench import seed_inductor_cache

    with pytest.raises(FileNotFoundError, match="missing.tgz does not exist"):
        seed_inductor_cache(tmp_path / "missing.tgz", tmp_path / "c")
    (tmp_path / "junk.tgz").write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="junk.tgz is not a readable .tgz"):
        seed_inductor_cache(tmp_path / "junk.tgz", tmp_path / "c")
    good = _archive(tmp_path / "good.tgz", {"./cache/x": b"0" * 4096})
    (tmp_path / "cut.tgz").write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="cut.tgz is not a readable .tgz"):
        seed_inductor_cache(tmp_path / "cut.tgz", tmp_path / "c")
    evil = _archive(tmp_path / "evil.tgz", {"../escaped": b"x"})
    with pytest.raises(ValueError, match="unsafe member"):
        seed_inductor_cache(evil, tmp_path / "c")
    assert not (tmp_path / "escaped").exists()


def test_committed_h200_autotune_archive_is_readable(tmp_path, monkeypatch):
    # the decisions that let a bare H200 compile the max-autotune baseline in minutes
    from recycore.bench import AUTOTUNE_ARCHIVE, seed_inductor_cache

    monkeypatch.delenv("RECYCORE_AUTOTUNE_ARCHIVE", raising=False)
    assert seed_inductor_cache(cache_dir=tmp_path) > 100
    names = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    assert any(n.startswith("cache/") for n in names) and any(n.endswith(".best_config") for n in names)
    assert AUTOTUNE_ARCHIVE.stat().st_size < 256 * 1024


def test_bench_unknown_path_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "recycore", "bench", "--paths", "fused,reference-fast"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown micro-step path(s) reference-fast" in result.stderr and "reference-max-autotune" in result.stderr


def test_profile_view_has_the_optimizer_step():
    # `recycore bench --profile` on the CPU profiler: the micro-step's families plus one optimiser step
    import torch

    from recycore.bench import format_profile, kernel_family, profile
    from recycore.config import Config
    from recycore.config import PRESETS

    torch._dynamo.reset()
    result = profile("reference-eager", Config().replace(**PRESETS["ci"]), batch_seqs=2, device="cpu")
    families = result["families"]
    assert families["optimizer"] > 0 and families["gemm"] > 0
    assert result["total_ms"] == pytest.approx(sum(families.values()))
    text = format_profile(result)
    assert "(micro-step + optimiser step)" in text and "optimizer" in text and "top kernels of the micro-step" in text
    # each family's largest kernels, every one of them in its family, their times within the family's
    listed = result["family_kernels"]
    assert listed["gemm"] and "largest gemm kernels:" in text
    for family, kernels in listed.items():
        assert all(kernel_family(name) == family for name, _ in kernels)
        assert sum(ms for _, ms in kernels) <= families[family] * (1 + 1e-9)


def test_fused_step_moves_about_half_the_bytes_of_the_reference():
    """Inductor's Triton code for the micro-step, generated on the CPU for an sm_90 target
    (generated_code_on_cpu): forward and backward graphs, real Triton kernels, and the fused path's
    elementwise kernels move at most 58% of the reference's bytes in either graph by inductor's own
    estimate (the folded norms, value blend and K1 epilogues took them below; benchmarks/README.md has the
    figures). No activation-sized pure copy."""
    import torch

    from recycore.bench import generated_code_on_cpu
    from recycore.config import PRESETS, Config

    cfg = Config(**dict(PRESETS["ci"], train_seq_len=1024))
    torch._dynamo.reset()
    totals = {}
    for path in ("fused", "reference-compiled"):
        codes = generated_code_on_cpu(path, cfg, batch_seqs=4)
        assert len(codes) == 2 and all("@triton.jit" in code and "def call(" in code for code in codes), path
        totals[path] = [sum(nbytes for *_, nbytes in kernel_traffic(code)) for code in codes]
        activation = 4 * cfg.train_seq_len * cfg.model_dim * 2  # one (B, T, d) bf16 tensor
        for code in codes:
            sizes = {name: nbytes / launches for name, launches, nbytes in kernel_traffic(code)}
            assert all(sizes.get(name, 0) < activation for name in pure_copy_kernels(code)), path
    for fused, reference in zip(totals["fused"], totals["reference-compiled"]):
        assert 0 < fused <= 0.58 * reference, totals


@pytest.mark.parametrize("path", ["reference-eager", "reference-max-autotune", "reference-max-autotune-whole"])
def test_cpu_output_code_refuses_paths_it_cannot_compile(path):
    from recycore.bench import generated_code_on_cpu
    from recycore.config import PRESETS, Config

    with pytest.raises(ValueError, match=f"whole-model default-mode paths, not '{path}'"):
        generated_code_on_cpu(path, Config(**PRESETS["ci"]))
