"""The benchmark harnesses measure what they say: FLOP counts, the training step, peak memory, GPU paths.

The GPU benchmark functions take a device, so their logic runs here on the CPU with tiny models. The
side-by-side harness needs a checkout of the reference implementation: set ``FLOWVID_REFERENCE`` to run
those tests (they are skipped otherwise).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
adherence = importlib.import_module("adherence")
finetune = importlib.import_module("finetune")
gpu = importlib.import_module("gpu")
memory = importlib.import_module("memory")
negative_prompt = importlib.import_module("negative_prompt")
reference = importlib.import_module("reference")
run_all = importlib.import_module("run_all")
sampling = importlib.import_module("sampling")
streaming = importlib.import_module("streaming")
train_throughput = importlib.import_module("train_throughput")

TINY_CONFIG = reference.SharedConfig(width=32, deep_depth=1, shallow_blocks=1, shallow_depth=1, head_dim=16,
                                     channels=3, frame_size=(2, 2), frames=2, text_length=3, text_width=8, batch=2)
TINY_PRESET = dict(num_shallow=1, shallow_width=32, shallow_depth=1, deep_width=32, deep_depth=1, head_dim=16)
REFERENCE_PATH = os.environ.get("FLOWVID_REFERENCE")
needs_reference = pytest.mark.skipif(not REFERENCE_PATH, reason="set FLOWVID_REFERENCE to a reference checkout")


def test_model_flops_follow_the_6_parameters_tokens_convention():
    config = replace(TINY_CONFIG, batch=3)
    assert train_throughput.model_flops(1000, config) == 6 * 1000 * 3 * config.tokens


def test_counted_matmul_flops_of_a_step_are_six_times_the_linear_layers_work():
    """Forward 2, backward 4 FLOPs per weight and row, except the input gradient of the first layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    step = train_throughput.make_step(model, lambda: model(x).square().mean())
    rows = x.shape[0]
    expected = 6 * rows * 16 * 4 + 4 * rows * 8 * 16  # no gradient flows into x
    assert train_throughput.counted_matmul_flops(step) == expected


def test_attention_flops_count_queries_times_keys_per_layer():
    config = TINY_CONFIG
    per_frame = 4
    shallow = config.batch * config.frames * per_frame**2
    deep = config.batch * (config.tokens + config.text_length) ** 2
    assert train_throughput.attention_flops(config) == 12 * config.width * (shallow + deep)


def test_attention_flops_of_a_long_video_count_the_bands_the_deep_block_computes():
    config = replace(TINY_CONFIG, frame_size=(8, 8), frames=16, text_length=16, shallow_blocks=0)
    full_square = 12 * config.width * config.batch * (config.tokens + config.text_length) ** 2
    assert 0.5 * full_square < train_throughput.attention_flops(config) < 0.65 * full_square


def test_training_step_lowers_the_loss_it_reports():
    torch.manual_seed(0)
    flow = TINY_CONFIG.build_flow()
    x, text = TINY_CONFIG.inputs()
    step = train_throughput.make_step(flow, lambda: train_throughput.flow_loss(flow, x, text))
    losses = [step() for _ in range(5)]
    assert losses[-1] < losses[0]
    z, logdet = flow(x, text)
    expected = 0.5 * z.pow(2).mean() - logdet.mean() / x[0].numel()
    torch.testing.assert_close(train_throughput.flow_loss(flow, x, text), expected)


def test_bf16_mixed_step_runs_the_network_in_bf16_and_keeps_fp32_weights():
    torch.manual_seed(0)
    flow = TINY_CONFIG.build_flow()
    x, text = TINY_CONFIG.inputs()
    seen = []
    hook = flow.deep.layers[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    step = train_throughput.make_step(flow, lambda: train_throughput.flow_loss(flow, x, text), precision="bf16-mixed")
    losses = [step() for _ in range(5)]
    hook.remove()
    assert set(seen) == {torch.bfloat16}
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in flow.parameters())


def test_measure_width_reports_throughput_and_utilisation():
    result = train_throughput.measure_width(TINY_CONFIG, rounds=2, reference=None)
    ours = result["implementations"]["flowvid"]
    assert result["tokens_per_step"] == TINY_CONFIG.batch * TINY_CONFIG.tokens
    assert ours["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / (ours["step_ms"] / 1e3))
    assert 0 < ours["mfu"] < ours["hfu"]  # executed work includes attention and text tokens
    assert result["executed_flops_per_step"] > result["model_flops_per_step"] > 0
    assert "speedup_over_reference" not in result
    assert result["precision"] == "32-true"


def test_the_training_benchmark_runs_under_the_wait_policy_it_is_given(monkeypatch):
    """run_all compares OpenMP's default wait policy with PASSIVE: the benchmark must not set one itself."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    importlib.reload(train_throughput)  # what a process started without OMP_WAIT_POLICY runs first
    assert "OMP_WAIT_POLICY" not in os.environ
    assert run_all.wait_policy() == run_all.OPENMP_DEFAULT
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert run_all.wait_policy() == "PASSIVE"


def test_a_thread_setting_run_under_another_wait_policy_counts_as_failed(monkeypatch, tmp_path):
    given = []

    def benchmark_that_forces_passive(script, arguments, json_path, env):
        given.append(env.get("OMP_WAIT_POLICY"))
        result = {"omp_wait_policy": "PASSIVE", "results": [{"implementations": {"flowvid": {"step_ms": 500.0}}}]}
        json_path.write_text(json.dumps(result))
        return "output"

    monkeypatch.setattr(run_all, "run", benchmark_that_forces_passive)
    monkeypatch.setattr(run_all, "FAILURES", [])
    table = run_all.thread_settings(tmp_path, cycles=1)
    assert given == [None, "PASSIVE", "PASSIVE"]  # the default row leaves the variable unset
    assert run_all.FAILURES == ["thread settings, 2 threads, OpenMP's default wait policy: ran under PASSIVE"]
    assert "| 2 threads, OpenMP's default wait policy |" not in table
    assert "| 2 threads, OMP_WAIT_POLICY=PASSIVE | 500 | 500 |" in table


def test_a_bad_reference_checkout_stops_the_training_benchmark_before_it_measures(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train_throughput, "measure_width", mock.Mock(side_effect=AssertionError("measured")))
    with pytest.raises(SystemExit) as exit_:
        train_throughput.main(["--reference", str(tmp_path)])
    assert exit_.value.code == 2 and "transformer_flow.py" in capsys.readouterr().err


def test_peak_rss_sees_the_memory_a_process_touches(tmp_path):
    small, _ = memory.run_measured([sys.executable, "-c", "pass"], tmp_path)
    touch_300_mib = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    large, _ = memory.run_measured([sys.executable, "-c", touch_300_mib], tmp_path)
    assert large - small > 250


def test_a_failing_command_is_an_error_that_shows_its_output(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        memory.run_measured([sys.executable, "-c", "raise SystemExit('boom')"], tmp_path)


def test_gpu_training_benchmark_logic_runs_on_any_device():
    result = gpu.training_mfu(torch.device("cpu"), batch=1, frames=2, frame_size=(2, 2), steps=1, matmul_size=32,
                              text_width=8, **TINY_PRESET)
    assert result["device"] == "cpu" and result["tokens_per_step"] == 8
    assert result["tokens_per_s"] > 0 and result["mfu"] > 0


def test_gpu_sampling_benchmark_logic_runs_on_any_device():
    result = gpu.jacobi_vs_sequential(torch.device("cpu"), frames=2, frame_size=(4, 8), batch=1, text_width=8,
                                      **TINY_PRESET)
    for jacobi in result["jacobi"].values():
        assert jacobi["relative_l2"] < 0.05  # bf16 network, tolerance 1e-2
        assert jacobi["deep_passes"] >= 1 and jacobi["seconds"] > 0
    # Frames of 32 slots: 16-slot blocks invert the first frame (and the shallow blocks) in two blocks, one
    # after the other; whole-frame blocks in one.
    in_a_row = {name: jacobi["passes_in_a_row"] for name, jacobi in result["jacobi"].items()}
    assert result["jacobi"]["frame_blocks"]["first_block_size"] == 32
    assert in_a_row["frame_blocks"]["shallow"] < in_a_row["16_slot_blocks"]["shallow"]
    assert in_a_row["frame_blocks"]["deep"] < in_a_row["16_slot_blocks"]["deep"]
    assert result["reencoded_relative_l2"] < 0.05
    assert result["z_dtype"] == result["logdet_dtype"] == result["sample_dtype"] == "torch.float32"


def test_text_prefix_attention_benchmark_logic_runs_on_a_cpu():
    result = gpu.text_prefix_attention(torch.device("cpu"), batch=2, heads=1, text_length=4, video_tokens=400,
                                       head_dim=8, repeats=1)
    assert result["shape"] == [2, 1, 404, 8]
    assert result["chunks_max_abs_difference"] < 1e-5  # 404 queries: three chunks, each over its keys
    assert all(result[f"{kind}_ms"] > 0 for kind in ("chunks", "one_masked_call", "causal_no_text"))
    assert "block_sparse_ms" not in result  # FlexAttention has no backward pass on a CPU


def test_gpu_training_benchmark_lists_the_slowest_operations_without_text():
    result = gpu.training_mfu(torch.device("cpu"), batch=1, frames=2, frame_size=(2, 2), steps=1, matmul_size=32,
                              text_width=8, text_length=0, profile=True, **TINY_PRESET)
    assert 0 < len(result["top_kernels"]) <= 15 and " ms (" in result["top_kernels"][0]


def test_a_failing_gpu_part_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    def broken() -> dict:
        raise RuntimeError("device mismatch")

    parts = {"first": broken, "second": lambda: {"step_ms": 1.0}, "third": lambda: {"step_ms": 2.0}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "gpu_parts", lambda device: parts)
    out = tmp_path / "gpu.json"
    result = gpu.run_all(str(out), only=["first", "second"])
    assert "RuntimeError: device mismatch" in result["first"]["error"]
    assert result["second"]["step_ms"] == 1.0 and "third" not in result
    assert json.loads(out.read_text()) == result


def test_the_gpu_benchmark_exits_1_when_a_part_failed(monkeypatch, tmp_path):
    def broken() -> dict:
        raise RuntimeError("device mismatch")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu, "gpu_parts", lambda device: {"broken": broken, "fine": lambda: {"step_ms": 1.0}})
    assert gpu.main(["--json", str(tmp_path / "gpu.json"), "--parts", "fine"]) == 0
    assert gpu.main(["--json", str(tmp_path / "gpu.json")]) == 1


def test_gpu_benchmarks_say_they_are_skipped_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.run_all() == {"skipped": gpu.SKIPPED}


def test_reference_loader_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="transformer_flow.py"):
        reference.load_reference(tmp_path)


def test_a_bad_reference_checkout_stops_the_jacobi_comparison_before_the_fit(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sampling, "fit_to_shapes", mock.Mock(side_effect=AssertionError("fitted")))
    with pytest.raises(SystemExit) as exit_:
        reference.main(["--reference", str(tmp_path)])
    assert exit_.value.code == 2 and "transformer_flow.py" in capsys.readouterr().err


@needs_reference
def test_reference_model_has_our_parameter_count_and_computes_our_function_on_video():
    from flowvid.testing import perturb_parameters

    module = reference.load_reference(REFERENCE_PATH)
    config = replace(TINY_CONFIG, width=64, head_dim=64, shallow_blocks=3, frame_size=(4, 4))
    flow = config.build_flow()
    # The deep block stays the identity: it reads text, which the two implementations rotate differently.
    perturb_parameters(flow.shallow, std=0.1)
    model = reference.build_reference(module, config)
    assert train_throughput.parameter_count(flow) == train_throughput.parameter_count(model)
    reference.copy_weights(flow, model)
    x, text = config.inputs()
    with torch.no_grad():
        z_ours = flow.encode(x, text)[0]
        z_theirs = model(reference.reference_video(x), text.tokens)[0].permute(0, 1, 3, 4, 2)
    assert (z_ours - x).norm() > 0.3 * x.norm()
    torch.testing.assert_close(z_ours, z_theirs, rtol=1e-5, atol=1e-5)


def tiny_checkpoint(folder: Path) -> Path:
    """A checkpoint of a tiny text-to-video model (3 latent frames of 2x2x3), its flow's weights perturbed."""
    from flowvid.export import build_module
    from flowvid.lit.checkpointing import METADATA_KEY, run_metadata
    from flowvid.testing import perturb_parameters

    config = {"model": {"class_path": "flowvid.lit.FlowModule", "init_args": {
        "flow": {"class_path": "flowvid.flows.GlobalLocalFlow",
                 "init_args": {"latent_channels": 3, "frame_size": [2, 2], **TINY_PRESET, "text_width": 16}},
        "text_encoder": {"class_path": "flowvid.text.LearnedTextEncoder",
                         "init_args": {"width": 16, "max_length": 4, "depth": 1, "head_dim": 16}},
        "video_shape": [3, 2, 2]}}}
    module = build_module(config)
    perturb_parameters(module.flow, std=0.05)
    path = folder / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), METADATA_KEY: run_metadata(module, config=config)}, path)
    return path


def test_sampling_benchmark_measures_a_trained_checkpoint(tmp_path):
    path = tiny_checkpoint(tmp_path)
    result = sampling.measure("demo", frames=1, batch=2, perturb=0.0, train_steps=0, repeats=1, checkpoint=str(path))
    assert result["video"] == [2, 3, 2, 2, 3] and result["weights"].startswith("trained")
    jacobi = {row["sampler"]: row for row in result["rows"]}["jacobi tol 1e-3"]
    assert jacobi["relative_l2"] < 1e-2 and jacobi["work"] >= 1.0
    assert torch.tensor(jacobi["relative_l2_per_frame"]).shape == (2, 3)  # videos x frames
    # Encoded again, the exact inverse gives back its noise; a Jacobi sample, a noise close to it.
    sequential = {row["sampler"]: row for row in result["rows"]}["sequential"]
    assert sequential["noise_residual"] < 1e-5 and 0 < jacobi["noise_residual"] < 1e-2

    mixed = sampling.measure("demo", frames=1, batch=2, perturb=0.0, train_steps=0, repeats=1, checkpoint=str(path),
                             precision="bf16-mixed")
    rows = {row["sampler"]: row for row in mixed["rows"]}
    assert rows["sequential"]["relative_l2"] == 0  # the exact inverse stays fp32: the yardstick of bf16 Jacobi
    assert 0 < rows["jacobi tol 1e-3"]["relative_l2"] < 5e-2
    assert "wall time in fp32 forward passes" in sampling.markdown(mixed)


def test_the_sequential_row_is_timed_as_often_as_the_jacobi_rows(monkeypatch, tmp_path):
    """Every row's forward-pass unit is the fastest of as many warm passes (it was one cold pass for sequential)."""
    repeats, timed = [], sampling.time_against_forward

    def counting(run, forward, times):
        repeats.append(times)
        return timed(run, forward, times)

    monkeypatch.setattr(sampling, "time_against_forward", counting)
    result = sampling.measure("demo", frames=1, batch=1, perturb=0.0, train_steps=0, repeats=2,
                              checkpoint=str(tiny_checkpoint(tmp_path)))
    assert repeats == [2] * len(result["rows"])


def test_passes_in_a_row_count_every_pass_of_every_block():
    from flowvid.flows import GlobalLocalFlow
    from flowvid.sampling import JacobiSampler
    from flowvid.testing import perturb_parameters

    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3))
    perturb_parameters(flow, std=0.05)
    sampler = JacobiSampler(first_block_size=1, block_size=1)  # a block of one slot is exact after one pass
    with torch.no_grad():
        sampler.sample(flow, torch.randn(2, 4, 2, 3, 3))
    # The deep block goes slot by slot through all 4 frames; the shallow ones through one frame, all
    # frames at once.
    assert sampling.passes_in_a_row(sampler.last_stats) == {"deep": 4 * 6, "shallow": len(flow.shallow) * 6}


def test_sampling_benchmark_adds_jacobi_at_the_tolerances_asked_for():
    default = sampling.variants()
    extra = sampling.variants((0.07, 0.1))[len(default):]
    assert [variant.label for variant in extra] == ["jacobi tol 0.07", "jacobi tol 0.1"]
    assert [variant.sampler().tol for variant in extra] == [0.07, 0.1]


def test_per_frame_error_locates_the_frame_that_differs():
    reference = torch.ones(2, 3, 2, 2, 4)
    x = reference.clone()
    x[1, 2] *= 1.5
    assert sampling.per_frame_relative_l2(x, reference) == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.5]]


def test_attention_kernel_benchmark_times_both_kernels_on_the_same_tokens():
    attention_kernels = importlib.import_module("attention_kernels")
    q, k, v = (torch.randn(2, 2, 16, 8).bfloat16() for _ in range(3))
    fp32 = attention_kernels.fp32_kernel(q, k, v)
    assert fp32.dtype == torch.bfloat16
    torch.testing.assert_close(fp32, F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                    is_causal=True).bfloat16(), rtol=0, atol=0)
    row = attention_kernels.measure(16, tokens=64)
    assert row["batch"] == 4
    assert all(row[f"{kernel}_{part}_ms"] > 0 for kernel in ("bf16", "fp32") for part in ("forward", "forward_backward"))


def test_finetune_benchmark_trains_adapters_only_and_counts_their_state():
    rows = finetune.measure_width(deep_width=64, rank=4, rounds=1, batch=1)
    full, lora = rows["full"], rows["lora r4"]
    assert full["trainable"] == full["parameters"]
    assert lora["parameters"] - lora["trainable"] == full["parameters"]  # every weight frozen, adapters added
    assert lora["adamw_state_mib"] == pytest.approx(full["adamw_state_mib"] * lora["trainable"] / full["trainable"])
    assert "| 64 | lora r4 |" in finetune.markdown({64: rows})


def test_negative_prompts_differ_from_the_caption_where_their_name_says():
    obj = {"colour": "red", "shape": "circle", "motion": "left"}
    caption = "a red circle moves left"
    assert negative_prompt.negative_caption("none", obj) == ""
    assert negative_prompt.negative_caption("opposite motion", obj) == "a red circle moves right"
    other = negative_prompt.negative_caption("other colour", obj).split()
    assert other[2:] == caption.split()[2:] and other[1] != "red"
    nothing = negative_prompt.negative_caption("nothing shared", obj).split()
    assert not {nothing[1], nothing[2], nothing[4]} & {"red", "circle", "left"}


def test_the_negative_prompt_probe_reads_what_a_video_shows():
    from flowvid.data.synthetic import render_video

    obj = {"colour": "red", "shape": "square", "motion": "up"}
    video = render_video({"objects": [obj], "background": "plain"}, frames=8, size=32)
    assert negative_prompt.attributes_found(video, obj) == {"colour": True, "motion": True, "shape": True,
                                                            "all": True}
    moving_down = negative_prompt.attributes_found(video, {**obj, "motion": "down"})
    assert moving_down == {"colour": True, "motion": False, "shape": True, "all": False}
    assert not any(negative_prompt.attributes_found(video, {**obj, "colour": "blue"}).values())


def test_the_negative_prompt_measurement_samples_every_kind_for_every_caption(tmp_path):
    module = tiny_text_to_video_module()
    objects = [{"colour": "red", "shape": "circle", "motion": "left"},
               {"colour": "blue", "shape": "square", "motion": "up"}]
    samples = [{"caption": f"a {o['colour']} {o['shape']} moves {o['motion']}", "meta": {"attributes": {"objects": [o]}}}
               for o in objects]
    results = negative_prompt.measure(module, samples, guidance=2.0)
    assert list(results) == list(negative_prompt.NEGATIVES)
    for row in results.values():
        assert set(row) == {"colour", "motion", "shape", "all"}
        assert all(value in (0.0, 0.5, 1.0) for value in row.values())  # two samples each
        assert row["all"] <= min(row["motion"], row["shape"]) <= row["colour"]


def tiny_text_to_video_module():
    from flowvid.export import build_module

    torch.manual_seed(0)
    return build_module({"model": {"class_path": "flowvid.lit.FlowModule", "init_args": {
        "flow": {"class_path": "flowvid.flows.GlobalLocalFlow",
                 "init_args": {"latent_channels": 12, "frame_size": [4, 4], "text_width": 16, **TINY_PRESET}},
        "codec": {"class_path": "flowvid.codecs.PixelCodec", "init_args": {"patch_size": 2}},
        "text_encoder": {"class_path": "flowvid.text.LearnedTextEncoder",
                         "init_args": {"width": 16, "max_length": 8, "depth": 1, "head_dim": 8}},
        "video_shape": [2, 8, 8]}}})


def test_caption_adherence_scores_the_captions_sampled_with_each_seed():
    from flowvid.data.synthetic import render_video

    objects = [{"colour": "red", "shape": "circle", "motion": "left"},
               {"colour": "blue", "shape": "square", "motion": "up"}]
    samples = [{"caption": f"a {o['colour']} {o['shape']} moves {o['motion']}", "meta": {"attributes": {"objects": [o]}}}
               for o in objects]
    module = tiny_text_to_video_module()
    results = adherence.adherence_per_seed(module, samples, [0, 1])  # sampled for real by the tiny model
    assert list(results) == [0, 1] and all(value in (0.0, 0.5, 1.0) for value in results.values())
    requests = []

    def the_captioned_videos(module, request, out):  # stands for a model that does what it is told
        requests.append(request)
        return [save_rendered(out, index, render_video({"objects": [o], "background": "plain"}, frames=2, size=8))
                for index, o in enumerate(objects[::-1] if request.seed == 8 else objects)]

    with mock.patch("flowvid.generate.run", the_captioned_videos):
        assert adherence.adherence_per_seed(module, samples, [7, 8]) == {7: 1.0, 8: 0.0}
    assert [r.seed for r in requests] == [7, 8] and requests[0].prompts == [s["caption"] for s in samples]


def save_rendered(folder: Path, index: int, video) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"video{index}.npy", video)
    return {"name": f"video{index}"}


def test_the_compiled_training_step_runs_on_a_compiled_copy_of_the_same_weights():
    torch.manual_seed(0)
    flow = TINY_CONFIG.build_flow()
    compiled = train_throughput.compiled_copy(flow)
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert all(block._compiled_call_impl is None for block in flow.blocks)  # the eager one stays eager
    for (name, a), (_, b) in zip(flow.state_dict().items(), compiled.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name


def test_streaming_arrival_times_count_from_the_start_of_the_iteration():
    ticks = iter([10.0, 10.5, 11.25, 13.0])
    frames = (frame for frame in "abc")
    assert streaming.arrival_times(frames, clock=lambda: next(ticks)) == [0.5, 1.25, 3.0]


def test_a_benchmark_that_hangs_is_stopped_and_reported_as_failed(monkeypatch, tmp_path):
    (tmp_path / "hangs.py").write_text("import time\ntime.sleep(600)\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all, "FAILURES", [])
    assert run_all.run("hangs.py", ["--rounds", "1"], tmp_path / "hangs.json", timeout_s=1) is None
    failure = "`python benchmarks/hangs.py --rounds 1`: timed out after 1 s"
    assert run_all.FAILURES == [failure]
    report = run_all.report({"Training throughput": ["a table"], "GPU": [None]}, ["no demo model: skipped"])
    assert report == (f"## Training throughput\n\na table\n\n## Not measured\n\n* no demo model: skipped\n\n"
                      f"## Failed\n\n* {failure}")


@pytest.mark.parametrize("script, option", [(streaming, "--ckpt"), (adherence, "--ckpt"), (negative_prompt, "--ckpt"),
                                            (sampling, "--checkpoint")])
def test_a_missing_model_stops_a_benchmark_with_one_line(script, option, tmp_path, capsys):
    missing = tmp_path / "step=00000640.ckpt"
    with pytest.raises(SystemExit) as exit_:
        script.main([option, str(missing)])
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and str(missing) in last_line and "`make demo` trains" in last_line
