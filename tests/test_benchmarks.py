"""The benchmark suite runs end to end in quick mode and writes what it promises.

Speed is not asserted (a shared CI machine cannot promise it); the JSON schema, the internal
consistency of the numbers, the FLOP model and the markdown report are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a directory of scripts beside the package, not installed
    sys.path.insert(0, str(ROOT))
RUNS = {"kv_cfg", "kv_nocfg", "kv_cfg_two_pass", "recompute_cfg"}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results" / "cpu-tiny-quick.json").read_text()), proc.stdout


@pytest.mark.slow
def test_quick_run_writes_schema(quick):
    out, r, stdout = quick
    assert r["schema"] == "omni-bench/1"
    assert r["settings"] == {"preset": "tiny", "device": "cpu", "quick": True, "threads": 1,
                             "parts": ["train", "generation", "data"]}
    for key in ("torch", "transformers", "diffusers", "python", "cpu", "commit"):
        assert key in r["machine"]
    assert positive(r["peaks"]["peak_tflops"]) and positive(r["peaks"]["bandwidth_gbs"])

    t = r["train"]
    for name in ("full", "backbone"):
        assert positive(t[name]["seconds"]) and positive(t[name]["tokens_per_s"]) and positive(t[name]["mfu"])
        mem = t[name]["memory"]
        # AdamW keeps two fp32 moments per parameter; gradients match the parameters.
        assert mem["grads_bytes"] == mem["params_bytes"]
        assert abs(mem["optimizer_bytes"] - 2 * mem["params_bytes"]) < 1024
        assert mem["saved_activations_bytes"] > 0
    assert t["full"]["memory"]["params_bytes"] > t["backbone"]["memory"]["params_bytes"]
    assert t["overhead_ratio"] == pytest.approx(t["full"]["seconds"] / t["backbone"]["seconds"], rel=0.01)
    assert t["batch"]["tokens"] == t["batch"]["rows"] * t["batch"]["seq_len"]  # rows are packed full
    assert t["flop_ratio"] > 1 and positive(t["head_only"]["seconds"])
    assert r["flop_model"]["bench-1b"]["flop_ratio"] < r["flop_model"]["tiny"]["flop_ratio"]

    g = r["generation"]
    assert g["image_tokens_per_image"] == 64 and set(g["batches"]) == {"1", "4"}
    for b, row in g["batches"].items():
        assert RUNS <= set(row)
        for name in RUNS:
            assert positive(row[name]["seconds"])
            assert row[name]["image_tokens_per_s"] == pytest.approx(int(b) * 64 / row[name]["seconds"], rel=0.01)
        for name in ("kv_cfg", "recompute_cfg"):
            split = row[name]["split"]
            assert sum(split.values()) == pytest.approx(1.0, abs=0.01) and split["head"] > 0
        assert row["kv_cache_speedup"] == pytest.approx(row["recompute_cfg"]["seconds"] / row["kv_cfg"]["seconds"],
                                                        rel=0.02)
        assert positive(row["bandwidth_floor_s"]) and positive(row["cfg_one_batch_speedup"])

    d = r["data"]
    assert positive(d["workers_0"]["docs_per_s"]) and positive(d["vs_training"]["loader_over_training"])

    names = {(x["name"], x["met"] is None) for x in r["targets"]}  # (target, not judged here)
    assert ("mfu", True) in names  # a GPU target is not judged on a CPU
    assert ("train_overhead", False) in names and ("kv_cache_speedup", False) in names
    report = (out / "RESULTS.md").read_text()
    assert "## cpu / tiny (quick" in report and "| batch | run | s/image |" in report
    assert "train_overhead" in stdout


def test_make_batch_packs_rows_and_flops_add_up(tiny_cfg):
    from benchmarks.bench_train import attention_pairs, make_batch, train_flops
    from omni.models.model import OmniModel

    model = OmniModel.from_config(tiny_cfg.model)
    batch = make_batch(model, rows=2, seq_len=100, caption=5, tail=3)
    n_img = model.image_tokenizer.num_tokens
    assert batch.n_tokens == 200  # per row: bos, three units of 5+1+16+1+3 = 26, 20 text ids, eos
    assert batch.n_image_targets == 2 * 3 * n_img
    assert attention_pairs(torch.tensor([[1, 1, 1, 2, 2, 0]])) == 6 + 3
    f = train_flops(model, batch)
    hf = model.backbone.config
    net = model.head.net
    # Once per target: the condition embedding and, with the head's own time path, the condition's
    # modulations; every other weight once per noise copy.
    once = net.cond_embed.weight.numel() + (sum(m[-1].weight.numel() for m in [*(b.ada for b in net.blocks),
                                                                                 net.final_ada]) if net.time_width else 0)
    head = 6 * batch.n_image_targets * (model.cfg.head.noise_copies * (sum(p.numel() for p in model.head.parameters())
                                        - once) + once)
    assert f["head"] == head
    lm = 6 * hf.hidden_size * hf.vocab_size
    in_proj = 6 * model.image_tokenizer.token_dim * hf.hidden_size * batch.image_tokens.shape[0]
    assert f["full"] - f["backbone"] == head + in_proj + lm * (batch.n_text_targets - batch.n_tokens)


def test_targets_judge_by_device():
    from benchmarks.run import evaluate_targets

    gen_row = {"kv_cache_speedup": 6.0, "cfg_one_batch_speedup": 1.2, "kv_cfg": {"over_floor": 2.0}}
    # Batch 16 on CUDA has no baselines; the faster of eager and the graphed head loop is judged.
    row16 = {"kv_cfg": {"over_floor": 4.0, "seconds_per_image": 0.05},
             "kv_cfg_graph": {"over_floor": 2.5, "seconds_per_image": 0.025}}
    result = {"settings": {"device": "cuda:0"}, "train": {"overhead_ratio": 1.1, "full": {"mfu": 0.35}},
              "generation": {"image_tokens_per_image": 64, "batches": {"1": gen_row, "16": row16}}}
    rows = evaluate_targets(result)
    met = {(t["name"], t["where"].split(",")[0]): t["met"] for t in rows}
    assert met == {("train_overhead", ""): True, ("mfu", ""): False, ("kv_cache_speedup", "batch 1"): True,
                   ("cfg_one_batch_speedup", "batch 1"): False, ("generation_over_bandwidth_floor", "batch 1"): True,
                   ("generation_over_bandwidth_floor", "batch 16"): True, ("generation_images_per_s", "batch 16"): True}
    assert {t["name"]: t["value"] for t in rows if t["where"].startswith("batch 16")} == {
        "generation_over_bandwidth_floor": 2.5, "generation_images_per_s": 40.0}
    result["settings"]["device"] = "cpu"
    met = {t["name"]: t["met"] for t in evaluate_targets(result)}
    assert met["mfu"] is None and met["generation_over_bandwidth_floor"] is None and met["train_overhead"] is True


def test_generation_plans_put_the_targets_and_the_gpu_questions_first():
    from benchmarks.bench_generation import run_plan

    cpu = run_plan("cpu", 20, (1, 4, 16))
    assert all(set(runs) == RUNS | {"kv_cfg_schedule", "kv_cfg_fused"} for runs in cpu.values())
    assert cpu[1]["kv_cfg_schedule"][2] == {"schedule": "anneal:20:4:5"}
    assert cpu[1]["kv_cfg_fused"][0] == {"cuda_graphs": True, "static_cache": True}
    gpu = run_plan("cuda", 50, (1, 4, 16))
    step = ["kv_cfg_step_graph", "kv_cfg_step_graph_schedule", "kv_cfg_step_graph_bf16_head"]
    graphed = ["kv_cfg_graph", "kv_cfg_graph_schedule", "kv_cfg_graph_bf16_head"]
    assert list(gpu[1]) == ["kv_cfg", *step, *graphed, "kv_nocfg", "kv_cfg_two_pass", "recompute_cfg"]
    assert list(gpu[4]) == list(gpu[16]) == ["kv_cfg", *step, *graphed]  # the baselines at batch 1 only
    assert all(gpu[16][name][0] == {"cuda_graphs": True} for name in graphed)
    assert all(gpu[16][name][0]["static_cache"] and gpu[16][name][2] == {} for name in step)
    assert gpu[1]["kv_cfg_step_graph_schedule"][0]["image_steps_schedule"] == "anneal:50:10:5"
    assert gpu[16]["kv_cfg_graph_bf16_head"][2] == {"dtype": torch.bfloat16}


@pytest.mark.slow
def test_gpu_matrix_code_path_runs_on_cpu(capsys):
    """The CUDA matrix (sequential runs, one line each, ratios) run on a CPU: its code path is
    checked here so that a GPU session does not spend its minutes finding a typo."""
    from benchmarks.bench_generation import run

    g = run(quick=True, preset="tiny", device="cpu", threads=1, matrix="cuda")
    assert g["matrix"] == "cuda" and set(g["batches"]) == {"1", "4"}
    one, four = g["batches"]["1"], g["batches"]["4"]
    assert {"kv_cfg", "kv_cfg_graph", "kv_cfg_graph_schedule", "kv_cfg_graph_bf16_head", "recompute_cfg"} <= set(one)
    assert "recompute_cfg" not in four and positive(four["cuda_graph_speedup"]) and positive(one["kv_cache_speedup"])
    assert one["kv_cfg_graph_schedule"]["head_steps_per_token"] < one["kv_cfg_graph"]["head_steps_per_token"] == 5
    assert one["kv_cfg"]["ms_per_token_step"] == pytest.approx(1000 * one["kv_cfg"]["seconds"] / 64, rel=0.01)
    assert one["kv_cfg_step_graph_schedule"]["head_steps_per_token"] < one["kv_cfg_step_graph"]["head_steps_per_token"] == 5
    assert positive(one["step_graph_speedup"]) and positive(four["step_graph_schedule_speedup"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("batch")]
    assert len(lines) == 10 + 7 and all("ms/token step" in x and "x floor" in x for x in lines)


@pytest.mark.parametrize("time_width", [0, 64])
def test_train_flops_of_the_head_match_what_it_runs(tokenizer_dir, time_width):
    """The head's FLOPs in `train_flops` (per copy, and once per target for what the copies share)
    against the matmul FLOPs its loss and backward really run, with and without its own time path."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_train import make_batch, train_flops
    from omni.config import load_config
    from omni.models.model import OmniModel

    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", f"model.head.time_width={time_width}"])
    model = OmniModel.from_config(cfg.model)
    batch = make_batch(model, rows=2, seq_len=100, caption=5, tail=3)
    k = batch.n_image_targets
    cond = torch.randn(k, cfg.model.backbone.hidden_size, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model.head.loss(torch.randn(k, model.image_tokenizer.token_dim), cond).backward()
    assert train_flops(model, batch)["head"] == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_cpu_benchmarks_step_in_the_trainers_precision(monkeypatch):
    """bench_compile, bench_grouped and bench_head time the step `omni train` runs: bf16 autocast
    only where the CPU computes bf16 natively; on an AVX2-only CPU fp32, as the trainer trains."""
    from benchmarks.common import train_autocast
    from omni.train import engine

    cpu = torch.device("cpu")
    for native, want in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(engine, "hardware_has_bf16", lambda native=native: native)
        amp, precision = train_autocast(cpu)
        assert precision == want
        with amp():
            assert torch.is_autocast_enabled("cpu") == native
            if native:
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_bench_head_quick_reports_both_heads(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_head", "--quick", "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "head-cpu-tiny-quick.json").read_text())
    assert set(r["sample"]) == {"1", "4"} and r["time_width"] == 64
    for row in [r["train"]["ms"], *r["sample"].values()]:
        assert positive(row["joint"]) and positive(row["time64"])
        assert row["ratio"] == pytest.approx(row["joint"] / row["time64"], rel=0.02)


def test_bench_parallel_counts_passes_and_reports_ratios():
    """bench_parallel in quick mode: one token per pass takes N passes per image, groups of k take
    N / k (and one head call per pass), and every row carries the ratio it promises."""
    from benchmarks import bench_parallel

    r = bench_parallel.run("tiny", "cpu", groups=("4", "4+ga"), batches=(1,), quick=True)
    n = r["image_tokens"]
    assert r["counts_off"] == {"passes_per_image": n, "head_calls_per_image": n}
    assert r["counts_4"] == r["counts_4+ga"] == {"passes_per_image": n // 4, "head_calls_per_image": n // 4}
    (row,) = r["rows"]
    assert row["batch"] == 1 and positive(row["s_per_image_off"]) and positive(row["s_per_image_4"])
    assert row["speedup_4"] == pytest.approx(row["s_per_image_off"] / row["s_per_image_4"], rel=0.02)


def test_bench_serve_trained_mix_judges_answers():
    """bench_serve --ckpt: each client's four requests are held-out benchmark samples whose judges
    accept the benchmark's own reference answer and refuse a wrong one; the requests differ
    between clients and carry the pictures as PNG data URLs."""
    import numpy as np

    from benchmarks import bench_serve

    mix = bench_serve.trained_mix("m", 3)
    assert [[r["kind"] for r in reqs] for reqs in mix] == [["text", "drawing", "caption", "story"]] * 3
    blank = ("image", np.full((32, 32, 3), 255, np.uint8))
    wrong = {"text": [("text", "zebra.")], "drawing": [blank], "caption": [("text", "nothing at all.")],
             "story": [("text", "the end.")]}
    for reqs in mix:
        for r in reqs:
            assert r["check"](r["answer"]), (r["kind"], r["answer"])
            assert not r["check"](wrong[r["kind"]]), r["kind"]
            assert {k for k, _ in r["answer"]} == r["want"]
    content = mix[0][0]["body"]["messages"][0]["content"]  # a question about an attached picture
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert len({json.dumps(reqs[1]["body"]) for reqs in mix}) == 3  # each client draws its own prompt


def test_bench_serve_profile_runs_the_bare_sampler(tmp_path, capsys):
    """bench_serve --profile: the bare sampler's two runs of the same plan (every request one at a
    time, then one row per client) and each one's costliest functions; the batched run takes fewer
    steps with more than one row live on average."""
    from benchmarks import bench_serve

    ckpt = bench_serve.make_checkpoint("tiny", tmp_path, small=True)
    _, plan = bench_serve.make_plan(ckpt.name, 2, trained=False)
    assert [[(c, k) for c, k, _ in reqs] for reqs in plan] == [[(0, k) for k in range(4)], [(1, k) for k in range(4)]]
    assert [b["seed"] for reqs in plan for _, _, b in reqs] == [1000 + i for i in range(8)]
    out = bench_serve.ceiling(str(ckpt), plan, threads=1, profile=5)
    assert out["concurrent_steps"] < out["alone_steps"] and 1 < out["concurrent_mean_rows"] <= 2
    assert out["throughput_ratio"] == pytest.approx(out["alone_s"] / out["concurrent_s"])
    err = capsys.readouterr().err
    assert "bare sampler, alone: the 5 costliest" in err and "bare sampler, concurrent: the 5 costliest" in err
    assert "tottime" in err


@pytest.mark.parametrize("name, fused, all_reduce", [("before", False, True), ("fused", True, True), ("now", True, False)])
def test_bench_step_variants_build_the_engine_they_name(tokenizer_dir, tmp_path, name, fused, all_reduce):
    """bench_step's variants: `before` is the engine as it was (foreach AdamW, the one-process
    all-reduce kept), `now` the engine setup_engine builds today."""
    from test_train_run import run_cfg, synthetic

    from benchmarks.bench_step import variant
    from omni.train import loop

    with variant(name):
        run = loop.prepare(run_cfg(tokenizer_dir, tmp_path / "run"), batches=synthetic(tokenizer_dir))
    try:
        opt = run.engine.optimizer
        opt = getattr(opt, "optimizer", opt)  # DeepSpeed may wrap the torch optimizer
        assert isinstance(opt, torch.optim.AdamW)
        assert bool(opt.defaults["fused"]) is fused and bool(opt.defaults["foreach"]) is not fused
        assert run.engine.enable_backward_allreduce is all_reduce
    finally:
        loop.finish(run, True)


def test_bench_step_split_times_each_part_of_the_step_and_names_the_kernels(tokenizer_dir, tmp_path):
    """`bench_step --split`: the loop's parts are timed in place over the steps asked for and add up
    to the step's wall time; the profiled steps name the kernels, the largest first."""
    from test_train_run import run_cfg, synthetic

    from benchmarks.bench_step import PARTS, timed_parts
    from omni.train.loop import train

    cfg = run_cfg(tokenizer_dir, tmp_path / "run", "train.steps=8")
    with timed_parts(2, 8, profile_steps=2) as result:
        train(cfg, batches=synthetic(tokenizer_dir))
    assert result["steps_timed"] == 4
    parts = result["parts_ms"]
    assert set(parts) == {*PARTS, "rest"}
    assert all(parts[p] > 0 for p in ("loader", "forward", "backward", "optimizer", "ema"))
    assert parts["rest"] > -0.5  # the parts are disjoint calls within the timed steps
    assert abs(sum(parts.values()) - result["ms_per_step"]) < 0.1
    shares = [k["self_share"] for k in result["kernels"]]
    assert 0 < len(shares) <= 8 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0
    assert any(k["name"] in ("aten::mm", "aten::addmm", "aten::bmm") for k in result["kernels"])


def test_bench_grouped_times_both_attentions_on_the_same_batches(tokenizer_dir, tmp_path):
    """bench_grouped's stage: both variants on each batch, their losses equal (the same function),
    the attention alone timed for each, the layout's padding and documents reported."""
    from test_train_run import run_cfg, synthetic

    from benchmarks.bench_grouped import VARIANTS, models, stage

    cfg = run_cfg(tokenizer_dir, tmp_path / "run", "model.prompt_image_attention=bidirectional")
    batches = [b for _, b in zip(range(5), synthetic(tokenizer_dir)(0, 1))]
    pair = models(cfg, compile=False)
    out = stage(pair, batches, warm=2)
    losses = out["losses_first_batch"]
    for k in ("loss", "loss_text", "loss_image"):
        assert losses["grouped"][k] == pytest.approx(losses["sdpa"][k], abs=1e-4), k
    assert set(out["step_ms"]) == set(out["attention_ms"]) == set(VARIANTS)
    assert all(v > 0 for v in (*out["step_ms"].values(), *out["attention_ms"].values()))
    assert out["step_ratio_grouped_to_sdpa"] > 0
    real = [int((b.doc_ids > 0).sum()) for b in batches[2:]]
    total = [b.doc_ids.numel() for b in batches[2:]]
    assert out["padding_share"] == pytest.approx(1 - sum(r / t for r, t in zip(real, total)) / len(real), abs=1e-3)
    assert out["documents_per_batch"] == pytest.approx(
        sum(sum(int(row.max()) for row in b.doc_ids) for b in batches[2:]) / len(real), abs=0.05)


def test_schedule_quality_counts_the_head_steps_each_variant_runs(tokenizer_dir, tmp_path, capsys):
    """Each variant's row reports the head steps per token it actually ran (the schedule's mean over
    the image's tokens) and one score per base seed; --samples-per-prompt reaches the harness."""
    from benchmarks import schedule_quality
    from omni.config import GenerationConfig, steps_for_token
    from tests.conftest import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tokenizer_dir, tmp_path / "ckpt", "generation.image_steps=4")
    assert schedule_quality.main(["--ckpt", str(ckpt), "--benchmark", "shapes-t2i", "--limit", "2", "--seeds", "0", "7",
                                  "--samples-per-prompt", "2", "--batch-size", "4",
                                  "--variants", "constant", "anneal:8:2"]) == 0
    out = capsys.readouterr().out
    per_seed = [line for line in out.splitlines() if line.lstrip().startswith(("constant", "anneal:8:2"))]
    assert len(per_seed) == 4 and all("4 samples" in line for line in per_seed), out  # 2 prompts x 2 images
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    n = 16  # the tiny preset's image tokens
    anneal = sum(steps_for_token(GenerationConfig(image_steps_schedule="anneal:8:2"), i, n) for i in range(n)) / n
    assert float(rows["constant"][-3]) == 4.0  # generation.image_steps of the checkpoint
    assert float(rows["anneal:8:2"][-3]) == pytest.approx(anneal, abs=0.05) and anneal != 4.0


def test_results_md_is_built_from_the_suites_runs_beside_other_benchmarks_files(quick, tmp_path):
    """benchmarks/results also holds bench_serve's, bench_step's and bench_head's JSON (no suite
    schema): the report skips them instead of failing at the end of a whole benchmark run."""
    from benchmarks.report import write_report

    out, result, _ = quick
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cpu-tiny-quick.json").write_text(json.dumps(result))
    (tmp_path / "results" / "serve-cpu-tiny.json").write_text(json.dumps({"throughput_ratio": 3.2}))
    text = write_report(tmp_path).read_text()
    assert text == (out / "RESULTS.md").read_text()
