"""Smoke test of the benchmark (python -m flash_mha.bench) at tiny sizes on the CPU.

It runs end to end, writes the documented JSON (a header and one row per implementation and
point), every implementation gives a measurement or a recorded refusal, every output that was
checked agrees with the reference, and the report writer turns the file into a table (and plots).
No timing assertions.
"""
import json
import math
import re

import pytest
import torch

from flash_mha import bench, bench_plot

TINY = ["--tiny", "--device", "cpu", "--no-progress"]
# Two runs, so that FlexAttention (a CPU compile of several seconds per shape) sees two points only:
# every other implementation on the whole tiny grid, and flex on plain attention and dropout.
RUNS = (TINY + ["--impl", "!flex"],
        TINY + ["--impl", "flex", "--case", "plain,dropout", "--seqlen", "64", "--causal", "0"])
HEADER_KEYS = ("card", "card_short", "torch", "cuda", "git_commit", "sources_sha256", "date", "timing")
NUMBER_OR_NONE = ("fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_tflops", "bwd_tflops", "fwdbwd_tflops", "peak_mib",
                  "fwd_err", "grad_err")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    rows, outs = [], [tmp / f"tiny{i}.json" for i in range(len(RUNS))]
    for argv, out in zip(RUNS, outs):
        assert bench.main(argv + ["--out", str(out)]) == 0
        data = json.loads(out.read_text())
        rows += data["rows"]
    return {"header": data["header"], "rows": rows}, outs[0]


def _expected(argv):
    args = bench.parse_args(argv)
    device = torch.device("cpu")
    points = bench.build_points(args, bench.default_grid(device, args.quick, args.tiny))
    return [(p, impl) for p in points
            for impl in bench.select_impls(args.impl, bench.MODULE_IMPLS if p.embed_dim else bench.IMPLS, device)]


def test_header(results):
    data, _ = results
    head = data["header"]
    for key in HEADER_KEYS:
        assert key in head, key
    assert head["device"] == "cpu" and head["torch"] == torch.__version__
    assert head["complete"] is True
    assert head["sources_sha256"] == bench.source_digest() and re.fullmatch(r"[0-9a-f]{16}", head["sources_sha256"])


def test_row_schema(results):
    data, _ = results
    assert data["rows"]
    for r in data["rows"]:
        assert set(bench.ROW_FIELDS) <= set(r), set(bench.ROW_FIELDS) - set(r)
        assert isinstance(r["impl"], str) and isinstance(r["case"], str) and r["dtype"] in bench.DTYPES
        for key in ("hdim", "seqlen_q", "seqlen_k", "batch", "heads", "heads_kv"):
            assert isinstance(r[key], int) and r[key] > 0, key
        assert isinstance(r["causal"], bool) and isinstance(r["refused"], bool) and isinstance(r["ours"], bool)
        for key in NUMBER_OR_NONE:
            assert r[key] is None or isinstance(r[key], (int, float)), key
        if r["refused"]:
            assert isinstance(r["error"], str) and r["error"], r
        else:
            assert r["fwd_ms"] is not None and math.isfinite(r["fwd_ms"]), r
            assert r["check"] in ("ok", "fail", "skipped (dropout)"), r
            if r["embed_dim"] is None:
                assert r["fwd_tflops"] is not None, r
            if r["bwd_refused"]:
                assert isinstance(r["bwd_error"], str) and r["bwd_error"], r
            else:
                assert r["fwdbwd_ms"] is not None and r["bwd_ms"] is not None, r
        assert r["peak_mib"] is None  # CPU: no allocator statistics


def test_every_impl_has_a_row_or_refusal_at_every_point(results):
    data, _ = results
    seen = {}
    for r in data["rows"]:
        key = (r["impl"], r["case"], r["dtype"], r["hdim"], r["causal"], r["seqlen_q"], r["seqlen_k"], r["batch"],
               r["heads"], r["heads_kv"], r["embed_dim"])
        assert key not in seen, f"duplicate row {key}"
        seen[key] = r
    expected = [pi for argv in RUNS for pi in _expected(argv)]
    assert {p.case for p, _ in expected} >= set(bench.CASES) - {"float32"} | {"module"}
    assert {impl.name for _, impl in expected} == {i.name for i in bench.IMPLS + bench.MODULE_IMPLS
                                                   if "cpu" in i.devices}
    for p, impl in expected:
        key = (impl.name, p.case, bench.DTYPE_NAMES[p.dtype], p.hdim, p.causal, p.seqlen_q, p.seqlen_k, p.batch,
               p.heads, p.heads_kv, p.embed_dim)
        assert key in seen, f"no row for {key}"
    assert len(seen) == len(expected)


def test_flash_mha_runs_everything_and_checks_pass(results):
    data, _ = results
    for r in data["rows"]:
        assert r["check"] != "fail", r
        if r["ours"]:
            assert not r["refused"] and not r["bwd_refused"], r


def test_known_refusals_are_recorded(results):
    data, _ = results
    rows = {(r["impl"], r["case"], r["causal"]): r for r in data["rows"] if r["embed_dim"] is None}
    # torch's CPU flash kernel takes no dropout; FlexAttention has no dropout at all.
    assert rows[("sdpa_flash", "dropout", False)]["refused"]
    assert "NotImplementedError" in rows[("flex", "dropout", False)]["error"]


def test_report(results, tmp_path):
    data, out = results
    table = bench_plot.ratio_table(data["rows"])
    assert "| plain |" in table and "flash_mha" in table and "FlashMHA" in table
    paths = bench_plot.write_report(out, tmp_path)
    md = tmp_path / (out.stem + ".md")
    assert md in paths and "Refusals" in md.read_text()
    pytest.importorskip("matplotlib")
    assert any(p.suffix == ".png" for p in paths)


class _Refuses(bench.Impl):
    def prepare(self, x):
        raise ValueError("no such kernel\nsecond line")


def test_refusal_keeps_first_line():
    p = bench.Point("plain", torch.float32, 8, False, 1, 2, 2, 16, 16)
    x = bench.make_inputs(p, torch.device("cpu"), seed=0)
    r = bench.measure(_Refuses("refuser"), x, None, bench.Timer(torch.device("cpu"), 1, 1), max_scores=1e9)
    assert r["refused"] and r["error"] == "ValueError: no such kernel" and r["fwd_ms"] is None


def test_flops_convention():
    # FlashAttention: 4 * b * h * n^2 * d forward, halved when causal; bottom-right pairs when n_q != n_k.
    assert bench.attention_flops(2, 3, 128, 128, 64, False) == 4 * 2 * 3 * 128 * 128 * 64
    assert bench.attention_flops(2, 3, 128, 128, 64, True) == 2 * 2 * 3 * 128 * 128 * 64
    assert bench.attention_flops(1, 1, 2, 8, 1, True) == 4 * (7 + 8)
    assert bench.attention_flops(1, 1, 8, 2, 1, True) == 4 * (1 + 2)


class _Wrong(bench.Impl):
    def prepare(self, x):
        return lambda: x.q * 1.0  # not attention: the check against the reference must say so


def test_check_catches_a_wrong_output():
    p = bench.Point("plain", torch.float32, 8, False, 1, 2, 2, 16, 16)
    x = bench.make_inputs(p, torch.device("cpu"), seed=0)
    ref = bench.reference_slice(x, with_grads=True)
    r = bench.measure(_Wrong("wrong"), x, ref, bench.Timer(torch.device("cpu"), 1, 1), max_scores=1e9)
    assert not r["refused"] and r["check"] == "fail"


def test_cpu_check_writes_both_implementations(tmp_path, capsys):
    out = tmp_path / "cpu_check.json"
    assert bench.main(["--cpu-check", "--seqlen", "128,256", "--rounds", "1", "--warmup-ms", "1", "--rep-ms", "1",
                       "--no-progress", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["impl"], r["seqlen_q"]) for r in rows) == [("flash_mha", 128), ("flash_mha", 256),
                                                                ("sdpa", 128), ("sdpa", 256)]
    assert all(r["check"] == "ok" and r["fwdbwd_ms"] is not None for r in rows)
    assert "fwd+bwd ratio" in capsys.readouterr().out


def test_case_figures_pick_the_cases_dtype_without_a_plain_grid():
    """A run of extra cases only (no plain rows) still plots its bf16 cases, not float32 alone."""
    rows = [{"case": c, "dtype": dt} for c, dt in
            (("bias", "bf16"), ("gqa", "bf16"), ("float32", "fp32"), ("float32", "fp32"), ("float32", "fp32"))]
    assert bench_plot._main_dtype(rows) == "bf16"
    assert bench_plot._main_dtype(rows + [{"case": "plain", "dtype": "fp16"}]) == "fp16"
    assert bench_plot._main_dtype([]) is None
