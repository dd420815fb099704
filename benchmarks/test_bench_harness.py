"""The harness itself: lens-bench --quick end to end on CPU, a failing or missing provider is a row and
not a crash, and the correctness column catches wrong answers (NaN never passes)."""
import json

import pytest
import torch

from lens_kernels.bench import Case, Provider, Unavailable, compare, main, make_inputs, run_case, within_tolerance
from lens_kernels.bench.cases import WORK_MODELS, headline_cases
from lens_kernels.bench.providers import providers_for
from lens_kernels import reference
from lens_kernels.bench.runner import LOSS_CONFIG, reference_outputs

CPU = torch.device("cpu")
FAST = dict(warmup_ms=0.0, rep_ms=1.0, log=lambda line: None)


def test_quick_cli_writes_table_json_and_markdown(tmp_path, capsys):
    # compile is left out here: test_bench_loss_heads covers it once (its C++ build is the slow part);
    # so are the GPU backends, which would run interpreted if TRITON_INTERPRET=1 is set.
    assert main(["--quick", "--device", "cpu", "--exclude",
                 "compile,ours-triton,ours-cuda,ours-bare-triton,ours-bare-cuda", "--out", str(tmp_path),
                 "--warmup-ms", "0", "--rep-ms", "2"]) == 0
    printed = capsys.readouterr().out
    assert "CPU mode" in printed and "ours-torch" in printed and "eager" in printed
    (json_file,) = tmp_path.glob("*.json")
    result = json.loads(json_file.read_text())
    assert result["environment"]["torch"] == torch.__version__
    assert result["floor"]["copy_bytes_per_s"] > 0 and result["floor"]["matmul_flops_per_s"] > 0
    rows = result["rows"]
    assert {r["path"] for r in rows} == set(WORK_MODELS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["pct_floor"] > 0 and r["within_tol"], r
    for case in {r["case"] for r in rows}:  # the ratio is against our fastest backend of the case
        assert min(r["vs_ours"] for r in rows if r["case"] == case and r["kind"] == "ours") == pytest.approx(1.0)
    assert {r["provider"] for r in rows if r["path"] == "logits"} == {"ours-torch", "eager"}
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correctness_column_catches_wrong_and_nan_answers(dtype):
    case = Case("logits", B=3, T=8, V=53, dtype=dtype)
    inputs = make_inputs(case, CPU)
    inputs["logits"].requires_grad_(True)
    loss, grads = reference_outputs(case, inputs)
    assert within_tolerance(case, compare(case, (loss, grads), (loss, grads), inputs["mask"]))
    wrong_grad = (grads[0] * 1.2,)
    assert not within_tolerance(case, compare(case, (loss, wrong_grad), (loss, grads), inputs["mask"]))
    assert not within_tolerance(case, compare(case, (loss + 0.5, grads), (loss, grads), inputs["mask"]))
    nan_loss = loss * float("nan")
    assert not within_tolerance(case, compare(case, (nan_loss, grads), (loss, grads), inputs["mask"]))


def test_inputs_are_realistic_and_models_positive():
    case = Case("logits", B=4, T=16, V=101, dtype="float32")
    inputs = make_inputs(case, CPU)
    assert inputs["logits"].shape == (4, 17, 101) and inputs["logits"].abs().min() > 0
    assert (inputs["old_logps"] <= 0).all() and torch.isfinite(inputs["old_logps"]).all()
    assert not inputs["mask"][-1].any() and inputs["mask"][0].any()  # a fully masked row, and kept rows
    for c in headline_cases():
        amount, unit = c.work()
        assert amount > 0 and unit in ("bytes", "flops")
    # The headline logits case: 2 passes over 16384 x 151936 bf16 logits, about 9.96 GB.
    assert headline_cases()[0].work()[0] == pytest.approx(2 * 16384 * 151936 * 2, rel=1e-3)


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
    base = (torch.tensor(1.0), (torch.rand(5, 8, 5) + 0.5,))
    out = base[1][0].clone()
    out[4, 7, 4] += 0.25
    assert compare(case, (base[0], (out,)), base, None)["d_grad_rel"] == pytest.approx(
        0.25 / float(base[1][0].abs().max()))
    out[0, 0, 0] = float("nan")
    assert not within_tolerance(case, compare(case, (base[0], (out,)), base, None))


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lens_step_reference_is_the_composition_one_sequence_at_a_time(dtype):
    # The sequence-by-sequence reference equals group_advantages + policy_loss_from_logits on the
    # whole batch (the form tests/test_lens_policy_loss.py checks the op against).
    case = Case("lens-step", B=6, T=9, V=41, dtype=dtype, group_size=3)
    inputs = make_inputs(case, CPU)
    loss, (grad,) = reference_outputs(case, inputs)
    x = inputs["logits"].double().requires_grad_(True)
    logps = reference.token_logprobs(x[:, :-1], inputs["targets"], case.temperature, inputs["mask"])[0]
    adv = reference.group_advantages(inputs["rewards"], group_size=3, estimator="lens", old_logps=logps.detach(),
                                     mask=inputs["mask"])
    expected, _ = reference.policy_loss_from_logits(x[:, :-1], inputs["targets"], inputs["mask"], adv,
                                                    temperature=case.temperature, config=LOSS_CONFIG)
    expected.backward()
    assert grad.dtype == torch.float32 and grad.abs().max() > 0
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-6, atol=1e-9)


def test_lens_step_check_catches_wrong_advantages():
    # GRPO advantages give the negative group 0 where LENS gives it a push: outside the tolerance.
    import lens_kernels as lk

    case = Case("lens-step", B=4, T=16, V=53, dtype="float32", group_size=2)
    inputs = make_inputs(case, CPU)
    inputs["logits"].requires_grad_(True)
    base = reference_outputs(case, inputs)

    def step(estimator):
        loss = lk.lens_policy_loss_from_logits(inputs["logits"][:, :-1], inputs["targets"], inputs["mask"],
                                               inputs["rewards"], group_size=2, estimator=estimator,
                                               temperature=case.temperature, config=LOSS_CONFIG)[0]
        return loss, torch.autograd.grad(loss, [inputs["logits"]])

    assert within_tolerance(case, compare(case, step("lens"), base, inputs["mask"]))
    assert not within_tolerance(case, compare(case, step("grpo"), base, inputs["mask"]))
