"""harmonica.frontier on a tiny random 28x28 DiT: the table's structure and the invariants every row must keep.

The numbers say nothing about quality; the checks are that each row measures what it claims (its own
images from the shared noise, its speed against the uncached run of the same round), that resuming
recomputes nothing, and that a changed schedule is measured afresh.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

import harmonica as hc
import harmonica.testbed as tb
from harmonica import evaluate, frontier as fr
from harmonica.testbed.data import CLASS_NAMES
from harmonica.testbed.model import SCHEDULER_CONFIG

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

STEPS, BLOCKS, N, REF = 4, 2, 12, 8


def tiny_bed():
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=28, patch_size=7, in_channels=1, out_channels=1, num_layers=BLOCKS, num_attention_heads=2,
        attention_head_dim=8, num_embeds_ada_norm=10,
    ).eval().requires_grad_(False)
    return tb.Testbed(transformer=transformer, scheduler_config=dict(SCHEDULER_CONFIG), class_names=CLASS_NAMES,
                      null_class=10, image_size=28, in_channels=1)


class CountingJudge:
    """The real quality() (precision / recall skipped: the tiny runs have fewer samples than k needs),
    counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, labels):
        self.calls += 1
        return evaluate.quality(images, labels, precision_recall_k=None)


def router(order: int, seed: int = 1) -> hc.Router:
    return hc.Router.init(STEPS, BLOCKS, generator=torch.Generator().manual_seed(seed),
                          metadata={"method": "harmonica", "threshold": 0.5, "forecast_order": order})


def rows(bed, routers=None):
    rows = fr.default_rows(BLOCKS, STEPS, routers=routers, fora=(2,), taylorseer=(2,), orders=(1, 2),
                           reference_steps=REF)
    # A schedule that computes everything must give the uncached images exactly.
    rows.append(fr.FrontierRow("full", "sanity", STEPS, hc.Schedule.full(STEPS, BLOCKS)))
    return rows


RUN = dict(steps=STEPS, num_samples=N, seeds=(0, 100), reference_steps=REF, batch_size=5, timing_samples=4,
           timing_rounds=2, guidance_scale=2.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    bed, judge = tiny_bed(), CountingJudge()
    table = fr.frontier(bed, rows(bed, {"harmonica-o1": router(1)}), out=out, judge=judge, **RUN)
    return bed, out, judge, table


def test_fewer_steps_counts():
    assert fr.fewer_steps_counts(20) == [20, 18, 16, 14, 12, 11, 10, 9, 8, 7, 6, 5]
    assert fr.fewer_steps_counts(50) == [50, 45, 40, 36, 31, 28] + list(range(25, 12, -1))
    assert fr.fewer_steps_counts(4) == [4, 3, 2, 1]


def test_rows_and_invariants(run):
    bed, out, judge, table = run
    names = [r["name"] for r in table.rows]
    assert names[:2] == [f"uncached ({STEPS})", f"reference ({REF})"]
    assert [r["steps"] for r in table.rows if r["family"] == "fewer steps"] == [3, 2, 1]
    assert {"FORA N=2", "TaylorSeer o1 N=2", "TaylorSeer o2 N=2", "harmonica-o1", "full"} <= set(names)
    assert table.row("harmonica-o1")["family"] == "HarmoniCa forecast o1"
    assert table.row("TaylorSeer o2 N=2")["max_order"] == 2 and table.row("FORA N=2")["max_order"] == 0

    base = table.uncached
    assert base["theoretical_speedup"] == 1.0 and base["timing"]["speedup"] == 1.0
    assert base["timing"]["round_speedups"] == [1.0, 1.0]
    for row in table.rows:
        if row["family"] == "fewer steps":  # a step costs the same whatever the count
            assert row["theoretical_speedup"] == STEPS / row["steps"]
        if row["family"] == "reference":
            assert row["timing"] is None and set(row["quality"]) == {"0"}  # on the reference seed only
            assert row["quality"]["0"]["psnr_ref"] == fr.PSNR_CAP and row["theoretical_speedup"] == STEPS / REF
        else:
            assert set(row["quality"]) == {"0", "100"} and len(row["timing"]["seconds"]) == 2
            assert row["timing"]["speedup"] > 0
        for seed, q in row["quality"].items():
            assert {"fid_fmnist", "accuracy", "strict_accuracy", "psnr_uncached"} <= set(q)
            assert ("psnr_ref" in q) == (seed == "0")  # DDIM-200 (here 8) only on the first seed
            if "psnr_ref" in q:  # the mean MSE is at least the MSE of the mean PSNR (Jensen), equal if all equal
                assert q["mse_ref"] >= 10 ** (-q["psnr_ref"] / 10) * (1 - 1e-9)
    # The uncached row and an all-compute schedule reproduce the uncached images exactly.
    for name in (base["name"], "full"):
        for q in table.row(name)["quality"].values():
            assert q["psnr_uncached"] == fr.PSNR_CAP
    assert table.row("full")["quality"]["0"]["fid_fmnist"] == pytest.approx(base["quality"]["0"]["fid_fmnist"])
    assert table.row("full")["theoretical_speedup"] == pytest.approx(1.0)
    for name in ("FORA N=2", "TaylorSeer o1 N=2", "harmonica-o1"):
        row = table.row(name)
        assert row["cur"] > 0 and row["theoretical_speedup"] > 1
        assert all(q["psnr_uncached"] < fr.PSNR_CAP for q in row["quality"].values())
    # Forecasting changes the images (same mask as FORA's: reuse and forecast differ).
    assert (table.row("TaylorSeer o1 N=2")["quality"]["0"]["psnr_ref"]
            != table.row("FORA N=2")["quality"]["0"]["psnr_ref"])
    assert judge.calls == 2 * (len(names) - 1) + 1


def test_quality_is_that_of_the_rows_images(run):
    bed, _, _, table = run
    labels = torch.arange(N) % 10
    kw = dict(guidance_scale=2.0, batch_size=5)
    base = tb.generate(bed, labels, seed=100, num_inference_steps=STEPS, **kw)
    ref = tb.generate(bed, labels, seed=0, num_inference_steps=REF, **kw)
    schedule = hc.Schedule.taylorseer(STEPS, BLOCKS, 2, 2)
    hc.enable_cache(bed.transformer, schedule)
    try:
        cached = tb.generate(bed, labels, seed=100, num_inference_steps=STEPS, **kw)
        cached0 = tb.generate(bed, labels, seed=0, num_inference_steps=STEPS, **kw)
    finally:
        hc.disable_cache(bed.transformer)
    q = table.row("TaylorSeer o2 N=2")["quality"]
    assert q["100"]["fid_fmnist"] == pytest.approx(evaluate.fid_fmnist(cached))
    assert q["100"]["psnr_uncached"] == pytest.approx(float(evaluate.psnr(cached, base).mean()))
    assert q["0"]["psnr_ref"] == pytest.approx(float(evaluate.psnr(cached0, ref).mean()))
    fewer = tb.generate(bed, labels, seed=100, num_inference_steps=2, **kw)
    assert table.row("fewer steps (2)")["quality"]["100"]["accuracy"] == pytest.approx(
        evaluate.classifier_accuracy(fewer, labels))


def test_outputs_and_verdicts(run, tmp_path):
    _, out, _, table = run
    doc = json.loads((out / "frontier.json").read_text())
    assert [r["name"] for r in doc["rows"]] == [r["name"] for r in table.rows]
    md = (out / "table.md").read_text()
    assert md.count("\n| ") >= len(table.rows) + 1 and "PSNR vs DDIM-200" in md
    verdicts = {v["name"]: v for v in table.verdicts()}
    assert set(verdicts) == {"FORA N=2", "TaylorSeer o1 N=2", "TaylorSeer o2 N=2", "harmonica-o1", "full"}
    for v in verdicts.values():
        assert all(table.speed(table.row(r)) >= v["speed"] for r in v["rivals"])
        for key, m in v["measures"].items():
            assert m["against"] in v["rivals"] and m["seeds"] >= 1 and m["beats_all"] == (m["margin"] > 0)
    # Paired differences: the mean over seeds of the per-seed differences.
    a, b = table.row("FORA N=2"), table.uncached
    diff, _, n = table.paired(a, b, "fid_fmnist")
    assert n == 2 and diff == pytest.approx(table.value(a, "fid_fmnist")[0] - table.value(b, "fid_fmnist")[0])
    png = fr.plot([table, table], tmp_path / "f.png")
    assert png.stat().st_size > 10_000


def test_resume_computes_only_what_is_missing_and_remeasures_changed_schedules(run):
    bed, out, _, table = run
    judge = CountingJudge()
    again = fr.frontier(bed, rows(bed, {"harmonica-o1": router(1)}), out=out, judge=judge, **RUN)
    assert judge.calls == 0 and again.row("FORA N=2") == table.row("FORA N=2")
    # The router retrained (another schedule under the same name) and a new row: only those are measured.
    judge = CountingJudge()
    extra = [fr.FrontierRow("FORA N=3", "FORA", STEPS, hc.Schedule.fora(STEPS, BLOCKS, 3))]
    again = fr.frontier(bed, rows(bed, {"harmonica-o1": router(1, seed=7)}) + extra, out=out, judge=judge,
                        time_rows=False, **RUN)
    assert judge.calls == 4 and again.row("FORA N=3")["timing"] is None
    assert again.row("harmonica-o1")["plan"] != table.row("harmonica-o1")["plan"]
    # Another seed: every row is measured on it, nothing else; rows lacking it are flagged in the table.
    judge = CountingJudge()
    more = fr.frontier(bed, rows(bed) + extra, out=out, judge=judge, time_rows=False, **dict(RUN, seeds=(0, 100, 200)))
    assert judge.calls == len(more.rows) - 1 and more.settings["seeds"] == [0, 100, 200]
    assert all(more.complete(r) for r in more.rows) and "seeds 2/3" not in more.markdown()
    assert "(seeds 2/3)" in fr.Frontier(more.settings, [table.uncached, table.row("FORA N=2")]).markdown()
    # Rows of earlier calls stay in the file when a call measures a subset.
    subset = fr.frontier(bed, [r for r in rows(bed) if r.family == "uncached"], out=out, judge=judge, **RUN)
    assert [r["name"] for r in subset.rows] == [f"uncached ({STEPS})"]
    assert "FORA N=3" in [r["name"] for r in fr.load(out).rows]
    with pytest.raises(ValueError, match="other settings"):
        fr.frontier(bed, rows(bed), out=out, judge=judge, **dict(RUN, num_samples=10))


def test_bad_inputs_are_refused():
    bed = tiny_bed()
    with pytest.raises(ValueError, match="at least 3 apart"):
        fr.frontier(bed, rows(bed), **dict(RUN, seeds=(0, 1)))
    with pytest.raises(ValueError, match="exactly one uncached row"):
        fr.frontier(bed, [r for r in rows(bed) if r.family != "uncached"], **RUN)
    with pytest.raises(ValueError, match="router 'x' has 5 steps"):
        fr.default_rows(BLOCKS, STEPS, routers={"x": hc.Router.init(5, BLOCKS)})


def test_router_rows_form_one_curve_per_method_and_order_and_a_methodless_router_stands_alone():
    start = hc.Router.from_schedule(hc.Schedule.taylorseer(STEPS, BLOCKS, 2, order=2))
    got = fr.default_rows(BLOCKS, STEPS, routers={"a": router(1), "b": router(1, seed=2), "c": router(0),
                                                  "moved": start, "other": start},
                          fora=(), taylorseer=(), fewer=())
    family = {r.name: r.family for r in got}
    assert [family[k] for k in ("a", "b", "c", "moved", "other")] == [
        "HarmoniCa forecast o1", "HarmoniCa forecast o1", "HarmoniCa reuse", "moved", "other"]


def test_a_schedule_is_a_row_of_its_own_as_it_is():
    schedule = hc.Schedule.taylorseer(STEPS, BLOCKS, 3, order=1)
    (row,) = [r for r in fr.default_rows(BLOCKS, STEPS, routers={"mine": schedule}, fora=(), taylorseer=(), fewer=())
              if r.name == "mine"]
    assert (row.family, row.steps, row.schedule) == ("mine", STEPS, schedule)
    with pytest.raises(ValueError, match="router 'x' has 5 steps"):
        fr.default_rows(BLOCKS, STEPS, routers={"x": hc.Schedule.full(5, BLOCKS)})


def test_cli_hook_reaches_the_frontier(capsys):
    from harmonica.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--frontier", "--help"])
    assert exit_info.value.code == 0 and "--reference-seeds" in capsys.readouterr().out


def test_uncached_images_are_kept_once_and_read_back(tmp_path):
    settings = {"model": "m", "guidance_scale": 2.0, "num_samples": 3, "batch_size": 3}
    made = []

    def make():
        made.append(1)
        return torch.arange(12.0).view(3, 1, 2, 2)

    first = fr._cached_images(tmp_path / "images", settings, "uncached (4)", 7, make)
    again = fr._cached_images(tmp_path / "images", settings, "uncached (4)", 7, make)
    assert len(made) == 1 and torch.equal(first, again)
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["m_uncached (4)_g2.0_n3_b3_s7.safetensors"]
    assert torch.equal(fr._cached_images(None, settings, "uncached (4)", 7, make), first) and len(made) == 2
