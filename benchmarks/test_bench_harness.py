"""The harness itself: lens-bench --quick end to end on CPU, a failing or missing provider is a row and
not a crash, and the correctness column catches wrong answers (NaN never passes)."""
import json
from pathlib import Path

import pytest
import torch

import lens_kernels
from lens_kernels.bench import Case, Provider, Unavailable, compare, main, make_inputs, run_case, within_tolerance
from lens_kernels.bench.cases import WORK_MODELS, headline_cases
from lens_kernels.bench.providers import grad_leaves, providers_for
from lens_kernels import reference
from lens_kernels.bench.runner import LOSS_CONFIG, reference_outputs

CPU = torch.device("cpu")
FAST = dict(warmup_ms=0.0, rep_ms=1.0, log=lambda line: None)


def test_quick_cli_writes_table_json_and_markdown(tmp_path, capsys):
    # compile is left out here: test_bench_loss_heads covers it once (its C++ build is the slow part);
    # so are the GPU backends and their variants, which run interpreted when TRITON_INTERPRET=1 is set (as
    # the triton tests set it when tests/ and benchmarks/ run in one session).
    gpu = [f"ours{kind}-{b}{variant}" for b in ("triton", "cuda") for kind, variant in
           (("", ""), ("-bare", ""), ("", ":slice-copy"), ("", ":go=1/8"))]
    assert main(["--quick", "--device", "cpu", "--exclude", ",".join(["compile", *gpu]), "--out", str(tmp_path),
                 "--warmup-ms", "0", "--rep-ms", "2"]) == 0
    printed = capsys.readouterr().out
    assert "CPU mode" in printed and "ours-torch" in printed and "eager" in printed
    # The relabelled columns and the legend's statements of what ran.
    assert "loss call ms" in printed and "fwd ms" not in printed and "clip % (ref)" in printed
    assert "our best case" in printed and "neither ran" in printed and "memory: resident set growth" in printed
    (json_file,) = tmp_path.glob("*.json")
    result = json.loads(json_file.read_text())
    assert result["environment"]["torch"] == torch.__version__
    assert result["floor"]["copy_bytes_per_s"] > 0 and result["floor"]["matmul_flops_per_s"] > 0
    env = result["environment"]
    # Reproducible: commit and dirty flag, the switches, the GPU state ("n/a" on CPU), seed, timer, rounds.
    if (Path(lens_kernels.__file__).resolve().parents[1] / ".git").exists():
        assert len(env["commit"]) == 40 and isinstance(env["dirty"], bool)
    else:  # a copy of the sources without git (a wheel, an unpacked tree)
        assert env["commit"] == "n/a" and env["dirty"] == "n/a"
    assert set(env["env_switches"]) >= {"LENS_KERNELS_TRITON_VARIANT", "LENS_KERNELS_CHECK"}
    assert env["gpu_state_start"]["driver_version"] == "n/a" and env["gpu_state_end"]["clocks.sm"] == "n/a"
    assert result["seed"] == 0 and result["timer"] == "time.perf_counter" and result["rounds"] == 3
    rows = result["rows"]
    assert {r["path"] for r in rows} == set(WORK_MODELS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["pct_floor"] > 0 and r["within_tol"], r
        assert len(r["rounds"]) == 3 and r["reps"] >= 9 and r["spread_pct"] >= 0, r
        assert r["extra_gib"] is not None and "resident set" in r["memory_method"], r
        assert r["kind"] == "peer" or r["inplace"] == "off (inplace=False)", r
        assert 0 < r["shape"]["kept_fraction"] < 1 and r["shape"]["B"] * r["shape"]["T"] == r["shape"]["N"]
        if r["path"] in ("logits", "hidden", "lens-step"):
            assert r["loss_call_ms"] > 0, r
        if r["path"] in ("logits", "hidden"):
            assert r["clip_ref"] is not None and r["d_clip"] == 0.0, r
    for case in {r["case"] for r in rows}:  # the ratio is against our fastest backend of the case
        assert min(r["vs_ours"] for r in rows if r["case"] == case and r["kind"] == "ours") == pytest.approx(1.0)
    assert {r["provider"] for r in rows if r["path"] == "logits"} == {
        "ours-torch", "ours-torch:slice-copy", "ours-torch:go=1/8", "eager"}
    assert {r["provider"] for r in rows if r["path"] == "lens-step"} == {"ours-torch", "ours-bare-torch", "eager"}
    assert (tmp_path / json_file.name.replace(".json", ".md")).read_text().startswith("# lens-bench report")


def test_failing_and_missing_providers_are_rows():
    def broken(case, inputs):
        def run():
            raise RuntimeError("kernel exploded")
        return run

    def missing(case, inputs):
        raise Unavailable("not installed")

    case = Case("logits-fwd", B=2, T=8, V=37, dtype="float32")
    providers = providers_for(CPU, only=["ours"]) + [
        Provider("broken", "peer", ("logits-fwd",), broken), Provider("missing", "peer", ("logits-fwd",), missing)]
    rows = {r["provider"]: r for r in run_case(case, providers, CPU, **FAST)}
    assert rows["ours-torch"]["status"] == "ok"
    assert rows["broken"]["status"] == "failed" and "kernel exploded" in rows["broken"]["reason"]
    assert rows["missing"]["status"] == "unavailable" and rows["missing"]["reason"] == "not installed"


def _inputs(case, seed=0):
    inputs = make_inputs(case, CPU, seed=seed)
    inputs.pop("stats")
    for leaf in grad_leaves(case, inputs):
        leaf.requires_grad_(True)
    return inputs


def _check(case, inputs, provider, base, family="ours"):
    fn = provider.build(case, inputs)
    diffs = compare(case, fn(), base, inputs["mask"], upstream=getattr(fn, "upstream", 1.0))
    return within_tolerance(case, diffs, family), diffs


# A case with enough kept tokens that each clip direction holds tens of them, with both advantage signs.
CLIP_CASE = dict(B=4, T=256, V=53)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correctness_column_catches_wrong_and_nan_answers(dtype):
    case = Case("logits", B=3, T=8, V=53, dtype=dtype)
    inputs = _inputs(case)
    base = reference_outputs(case, inputs)
    loss, grads = base["loss"], base["grads"]
    assert within_tolerance(case, compare(case, (loss, grads), base, inputs["mask"]))
    for wrong in ((loss, (grads[0] * 1.04,)), (loss + 0.5, grads), (loss * float("nan"), grads)):
        assert not within_tolerance(case, compare(case, wrong, base, inputs["mask"]))


def _fake(name, make):
    return Provider(name, "ours", ("logits",), make)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_suite_flags_a_dropped_clip_a_wider_clip_and_a_scaled_gradient(dtype):
    import lens_kernels as lk
    from lens_kernels.bench import providers as P

    case = Case("logits", dtype=dtype, **CLIP_CASE)
    inputs = _inputs(case)
    base = reference_outputs(case, inputs)
    assert base["clip"] > 0.02  # the clip decides the gradient of a few percent of the kept tokens
    kept, tau = inputs["logits_kept"], case.temperature

    def ours_with(config, scale=1.0):
        def build(c, inp):
            def run():
                loss = lk.policy_loss_from_logits(kept, inp["targets"], inp["mask"], inp["advantages"],
                                                  old_logps=inp["old_logps"], temperature=tau, config=config,
                                                  backend="torch")[0]
                return loss, tuple(g * scale for g in torch.autograd.grad(loss, [kept]))
            return run
        return build

    def no_clip(c, inp):
        def run():
            logps = P.trl_selective_log_softmax(kept.float() / tau, inp["targets"])
            ratio = torch.exp(logps - inp["old_logps"])
            m = inp["mask"].float()
            loss = -(ratio * inp["advantages"][:, None] * m).sum() / m.sum()
            return loss, torch.autograd.grad(loss, [kept])
        return run

    good, diffs = _check(case, inputs, _fake("ours", ours_with(P.LOSS_CONFIG)), base)
    assert good and diffs["d_clip"] == 0.0, diffs
    wider = lk.LossConfig(policy_loss="ppo", epsilon_low=0.2, epsilon_high=0.28, loss_agg_mode="token-mean")
    for name, build in (("no-clip", no_clip), ("eps_high=0.28", ours_with(wider)),
                        ("grad x1.04", ours_with(P.LOSS_CONFIG, scale=1.04))):
        ok, diffs = _check(case, inputs, _fake(name, build), base)
        assert not ok, (name, diffs)
        if name != "grad x1.04":  # the clip column sees the first two on its own
            assert diffs["d_clip"] > 0, (name, diffs)


def test_suite_flags_a_hidden_copy():
    # Two exact providers that return the same gradient: one writes it straight into its output, the
    # other pays what slice_backward pays (a zero-filled [B, T + 1, V] buffer, the gradient copied into
    # it). Both are correct; only the second is flagged "copy?" by its working memory.
    from lens_kernels.bench.runner import _memory

    case = Case("logits", B=4, T=128, V=4096, dtype="float32")
    inputs = _inputs(case)
    base = reference_outputs(case, inputs)
    grad, loss = base["grads"][0], base["loss"]

    def direct():
        return loss, (grad.clone(),)

    def through_slice():
        g = grad.clone()
        whole = torch.zeros(case.B, case.T + 1, case.V)
        whole[:, :-1] = g
        del g
        return loss, (whole,)

    rows = {}
    for name, fn in (("direct", direct), ("slice", through_slice)):
        assert within_tolerance(case, compare(case, fn(), base, inputs["mask"]))
        rows[name] = {}
        _memory(rows[name], fn, CPU, case)
    assert not rows["direct"]["copy_flag"], rows
    assert rows["slice"]["copy_flag"], rows
    assert rows["slice"]["work_buffers"] == pytest.approx(1.0, abs=0.3), rows


def test_whole_buffer_gradient_must_be_zero_at_the_last_position_and_upstream_is_divided_out():
    case = Case("logits", B=3, T=8, V=53, dtype="float32")
    inputs = _inputs(case)
    base = reference_outputs(case, inputs)
    whole = torch.zeros(3, 9, 53)
    whole[:, :-1] = base["grads"][0]
    assert within_tolerance(case, compare(case, (base["loss"], (whole,)), base, inputs["mask"]))
    whole[1, -1, 7] = 1e-2 * float(base["grads"][0].abs().max())
    assert not within_tolerance(case, compare(case, (base["loss"], (whole,)), base, inputs["mask"]))
    eighth = (base["loss"], (base["grads"][0] / 8,))
    assert within_tolerance(case, compare(case, eighth, base, inputs["mask"], upstream=0.125))
    assert not within_tolerance(case, compare(case, eighth, base, inputs["mask"]))


def test_variant_rows_are_exact_and_the_slice_copy_returns_the_whole_buffer():
    case = Case("logits", B=3, T=16, V=101, dtype="float32")
    inputs = _inputs(case)
    base = reference_outputs(case, inputs)
    for provider in providers_for(CPU, only=["ours-torch:slice-copy", "ours-torch:go=1/8"]):
        fn = provider.build(case, inputs)
        loss, (grad,) = fn()
        assert grad.shape == ((3, 17, 101) if "slice" in provider.name else (3, 16, 101))
        ok, diffs = _check(case, inputs, provider, base)
        assert ok, (provider.name, diffs)
    assert fn.upstream == 0.125


def test_reference_on_a_subset_of_sequences_equals_the_full_one(monkeypatch):
    import lens_kernels.bench.runner as runner

    case = Case("logits", B=6, T=16, V=101, dtype="bfloat16")
    inputs = _inputs(case)
    full = reference_outputs(case, inputs)
    monkeypatch.setitem(runner.REFERENCE_MAX_GRAD_ELEMENTS, "cpu", 2 * 16 * 101)
    part = reference_outputs(case, inputs)
    rows = part["rows"]
    assert len(rows) == 2 and {float(inputs["advantages"][b].sign()) for b in rows} == {1.0, -1.0}
    assert part["grads"][0].shape == (2, 16, 101)
    torch.testing.assert_close(part["grads"][0], full["grads"][0][rows])
    torch.testing.assert_close(part["loss"], full["loss"])
    assert part["clip"] == full["clip"]
    scaled = full["grads"][0].clone()
    scaled[rows[1]] *= 1.04  # a wrong row among the checked ones is seen
    assert not within_tolerance(case, compare(case, (full["loss"], (scaled,)), part, inputs["mask"]))


def test_inputs_are_realistic_and_models_count_the_kept_fraction():
    case = Case("logits", dtype="float32", **CLIP_CASE)
    inputs = make_inputs(case, CPU)
    stats = inputs.pop("stats")
    assert inputs["logits"].shape == (4, 257, 53) and inputs["logits"].abs().min() > 0
    kept = inputs["logits_kept"]
    assert kept.shape == (4, 256, 53) and kept.data_ptr() == inputs["logits"].data_ptr()  # aliases the view
    assert (inputs["old_logps"] <= 0).all() and torch.isfinite(inputs["old_logps"]).all()
    assert not inputs["mask"][-1].any() and inputs["mask"][0].any()  # a fully masked row, and kept rows
    assert (inputs["advantages"] > 0).any() and (inputs["advantages"] < 0).any()
    # 5-10% of the kept tokens past 1 +- eps, in both directions; logits peaked like a trained policy's.
    assert 0.05 <= stats["past_clip_above"] + stats["past_clip_below"] <= 0.10, stats
    assert stats["past_clip_above"] > 0.02 and stats["past_clip_below"] > 0.02, stats
    assert stats["median_top1_prob"] > 0.7, stats
    hidden = make_inputs(Case("hidden", B=4, T=64, V=2003, H=256, dtype="float32"), CPU)["stats"]
    assert hidden["median_top1_prob"] > 0.5, hidden
    for c in headline_cases():
        amount, unit = c.work()
        assert amount > 0 and unit in ("bytes", "flops")
    # The headline logits case: read the kept 70.4% once, write the gradient once: 8.48 GB, not 9.96.
    headline = headline_cases()[0]
    assert headline.work(0.7036)[0] == pytest.approx((1 + 0.7036) * 16384 * 151936 * 2, rel=1e-3)
    assert headline.work(0.7036)[0] / 1e9 == pytest.approx(8.48, abs=0.01)
    assert headline.work(1.0)[0] == pytest.approx(2 * 16384 * 151936 * 2, rel=1e-3)
    with pytest.raises(ValueError, match="kept_fraction"):
        headline.work(1.5)


def test_headline_inputs_keep_about_70_percent_of_the_tokens():
    # The mask of the headline case alone (its logits are 5 GB): the kept fraction behind NOTES's floors.
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(512, 1025, (16,), generator=gen)
    lengths[-1] = 0
    assert float(lengths.sum()) / (16 * 1024) == pytest.approx(0.7036, abs=1e-4)


def test_plots_of_time_and_memory_against_v_and_n(tmp_path):
    pytest.importorskip("matplotlib")
    from lens_kernels.bench.report import write_plots

    cases = [Case("logits", B=b, T=8, V=v, dtype="float32") for b in (2, 4) for v in (37, 75)]
    rows = [r for c in cases for r in run_case(c, providers_for(CPU, only=["ours-torch", "eager"]), CPU, **FAST)]
    names = write_plots(rows, tmp_path, "t")
    assert sorted(names) == ["t_logits_vs_N.png", "t_logits_vs_V.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)


def test_gradient_difference_is_taken_slice_by_slice(monkeypatch):
    # Slices of a few rows: the worst difference is in the last slice, and a NaN in any slice fails.
    import lens_kernels.bench.runner as runner

    monkeypatch.setattr(runner, "COMPARE_CHUNK_ELEMENTS", 2 * 7 * 5)
    case = Case("logits", B=5, T=7, V=5, dtype="float32")
    base = dict(loss=torch.tensor(1.0), grads=[torch.rand(5, 7, 5) + 0.5], rows=None, clip=None)
    out = base["grads"][0].clone()
    out[4, 6, 4] += 0.25
    assert compare(case, (base["loss"], (out,)), base, None)["d_grad_rel"] == pytest.approx(
        0.25 / float(base["grads"][0].abs().max()))
    out[0, 0, 0] = float("nan")
    assert not within_tolerance(case, compare(case, (base["loss"], (out,)), base, None))


def test_lens_step_inputs_hold_a_negative_and_a_mixed_group_and_no_old_logps():
    case = Case("lens-step", B=6, T=8, V=31, dtype="float32", group_size=2)
    inputs = make_inputs(case, CPU)
    groups = inputs["rewards"].view(-1, 2)
    assert set(inputs["rewards"].tolist()) <= {0.0, 1.0}
    assert groups[0].sum() == 0 and groups[1].sum() == 1  # negative, mixed
    assert "old_logps" not in inputs and "advantages" not in inputs
    with pytest.raises(ValueError, match="whole groups"):
        make_inputs(Case("lens-step", B=3, T=8, V=31, dtype="float32", group_size=2), CPU)
    # 3 passes over the headline's bf16 logits (14.94 GB) plus per-token and per-sequence bytes.
    headline = [c for c in headline_cases() if c.path == "lens-step"][0]
    assert (headline.N, headline.V, headline.dtype) == (16384, 151936, "bfloat16")
    assert headline.work()[0] == pytest.approx(3 * 16384 * 151936 * 2, rel=1e-3)
    # At the headline's kept fraction: (2k + 1) passes, and the Liger two-stage baseline's (3k + 1) is 1.29x.
    assert headline.work(0.7036)[0] / 1e9 == pytest.approx(11.98, abs=0.01)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lens_step_reference_is_the_composition_one_sequence_at_a_time(dtype):
    # The sequence-by-sequence reference equals group_advantages + policy_loss_from_logits on the
    # whole batch (the form tests/test_lens_policy_loss.py checks the op against).
    case = Case("lens-step", B=6, T=9, V=41, dtype=dtype, group_size=3)
    inputs = make_inputs(case, CPU)
    ref = reference_outputs(case, inputs)
    loss, (grad,) = ref["loss"], ref["grads"]
    x = inputs["logits_kept"].double().requires_grad_(True)
    logps = reference.token_logprobs(x, inputs["targets"], case.temperature, inputs["mask"])[0]
    adv = reference.group_advantages(inputs["rewards"], group_size=3, estimator="lens", old_logps=logps.detach(),
                                     mask=inputs["mask"])
    expected, _ = reference.policy_loss_from_logits(x, inputs["targets"], inputs["mask"], adv,
                                                    temperature=case.temperature, config=LOSS_CONFIG)
    expected.backward()
    assert grad.dtype == torch.float32 and grad.abs().max() > 0
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-6, atol=1e-9)


def test_lens_step_check_catches_wrong_advantages():
    # GRPO advantages give the negative group 0 where LENS gives it a push: outside the tolerance.
    import lens_kernels as lk

    case = Case("lens-step", B=4, T=16, V=53, dtype="float32", group_size=2)
    inputs = _inputs(case)
    base = reference_outputs(case, inputs)

    def step(estimator):
        loss = lk.lens_policy_loss_from_logits(inputs["logits_kept"], inputs["targets"], inputs["mask"],
                                               inputs["rewards"], group_size=2, advantage_config=lk.AdvantageConfig(estimator=estimator),
                                               temperature=case.temperature, config=LOSS_CONFIG)[0]
        return loss, torch.autograd.grad(loss, [inputs["logits_kept"]])

    assert within_tolerance(case, compare(case, step("lens"), base, inputs["mask"]))
    assert not within_tolerance(case, compare(case, step("grpo"), base, inputs["mask"]))


def test_user_shape_and_dtype_and_the_cpu_grid():
    from lens_kernels.bench.cases import cpu_cases, parse_shape, user_cases, with_dtype
    from lens_kernels.bench.cli import parse_args, select_cases

    assert parse_shape("8x256x32000") == dict(B=8, T=256, V=32000)
    assert parse_shape("16x1024x151936x2048") == dict(B=16, T=1024, V=151936, H=2048)
    for bad in ("8x256", "8x0x5", "axbxc", "1x2x3x4x5"):
        with pytest.raises(ValueError, match="BxTxV"):
            parse_shape(bad)
    cases = user_cases(parse_shape("4x16x101"), "bfloat16", ["logits", "hidden", "lens-step", "advantages"])
    assert [(c.path, c.dtype, c.group_size) for c in cases] == [
        ("logits", "bfloat16", 8), ("lens-step", "bfloat16", 2), ("advantages", "float32", 2)]
    main, grid = select_cases(parse_args(["--shape", "2x8x33x16", "--dtype", "float16", "--paths", "hidden"]), CPU)
    assert [(c.path, c.B, c.T, c.V, c.H, c.dtype) for c in main] == [("hidden", 2, 8, 33, 16, "float16")] and not grid
    with pytest.raises(SystemExit):
        select_cases(parse_args(["--shape", "2x8x33", "--paths", "hidden"]), CPU)
    # The CPU default grid holds the torch backend issue's two shapes, fp32, fwd + bwd from logits.
    full = cpu_cases(quick=False)
    assert {(c.B, c.T, c.V) for c in full if c.path == "logits" and c.dtype == "float32"} >= {
        (8, 256, 32000), (4, 512, 151936)}
    assert all(c.V <= 8192 for c in cpu_cases(quick=True) if c.V)  # --quick stays small for CI
    assert {c.dtype for c in with_dtype(full, "bfloat16") if c.path != "advantages"} == {"bfloat16"}


def test_rounds_rotate_the_provider_order():
    calls = []

    def recorder(name):
        def build(case, inputs):
            def run():
                calls.append(name)
                return (torch.zeros(case.B),)
            return run
        return build

    case = Case("advantages", B=4, T=8, dtype="float32", group_size=2)
    providers = [Provider(n, "peer", ("advantages",), recorder(n)) for n in "abc"]
    rows = run_case(case, providers, CPU, warmup_ms=0.0, rep_ms=0.0, log=lambda line: None, rounds=3)
    assert all(len(r["rounds"]) == 3 and r["reps"] >= 9 for r in rows)
    # After the first call and the memory call of each, the timed rounds: a b c, then b c a, then c a b
    # (each provider's calls of a round run together; the loss-call figure is fwd/bwd paths only).
    timed = calls[6:]
    firsts = [timed[0]]
    for prev, cur in zip(timed, timed[1:]):
        if cur != prev:
            firsts.append(cur)
    assert firsts[:9] == list("abcbcacab"), firsts
