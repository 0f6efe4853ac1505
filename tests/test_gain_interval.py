"""The gain kept in perplexity and its paired-bootstrap interval over the evaluation texts."""

import math

import pytest
import torch
from tiny_models import make_family

from meswitch.evaluation.evaluate import Evaluator
from meswitch.evaluation.metrics import EvalData, Scorer, gain_kept_ci
from meswitch.evaluation.report import TARGET_2BIT, _gain_ci, _task_gain_ci, targets, targets_markdown


def _texts(n: int, seed: int = 0, kept: float = 0.99):
    """Per-text (NLL sums, tokens) of a base, an expert about 0.3 nats a token better, and a compressed expert
    that keeps about ``kept`` of that, each text with its own difficulty and gain."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(20, 200, (n,), generator=g).double()
    base = tokens * (3 + torch.rand(n, generator=g, dtype=torch.float64))
    gain = tokens * 0.3 * (1 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    expert = base - gain
    compressed = expert + (1 - kept) * gain + 0.002 * tokens * torch.randn(n, generator=g, dtype=torch.float64)
    units = tokens.tolist()
    return (base.tolist(), units), (expert.tolist(), units), (compressed.tolist(), units)


def test_the_expert_itself_keeps_the_whole_gain_and_the_base_none_with_degenerate_intervals():
    base, expert, _ = _texts(60)
    assert gain_kept_ci(base, expert, expert) == (1.0, 1.0, 1.0)
    assert gain_kept_ci(base, expert, base) == (0.0, 0.0, 0.0)


def test_interval_holds_the_point_narrows_with_more_texts_and_is_seeded():
    few, many = gain_kept_ci(*_texts(50)), gain_kept_ci(*_texts(800))
    for point, lo, hi in (few, many):
        assert lo < point < hi and 0.95 < point < 1.03
    assert many[2] - many[1] < 0.5 * (few[2] - few[1])  # 16x the texts: about a quarter of the width
    assert gain_kept_ci(*_texts(50)) == few  # seeded: the same texts give the same interval
    assert gain_kept_ci(*_texts(50), seed=1) != few
    with pytest.raises(ValueError, match="equally long"):
        base, expert, (c, u) = _texts(5)
        gain_kept_ci(base, expert, (c[:4], u[:4]))


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    """The toy family's expert (random noise on its base) is worse than its base on the texts, which leaves no gain
    to keep; with the two swapped, the "expert" gains about 5 of 312 in perplexity."""
    root = make_family(tmp_path_factory.mktemp("fam"))
    noisy = root / "experts" / "alpha"
    ev = Evaluator(noisy, root / "base", EvalData.load(noisy / "eval.jsonl"), "cpu")
    assert ev.ppl_expert < ev.ppl_base
    return ev


def _ppl(sums: list[float], units: list[int]) -> float:
    return math.exp(sum(sums) / sum(units))


def test_evaluator_per_text_figures_give_the_perplexities_and_the_gain_interval(evaluator):
    ev = evaluator
    same = ev.score(ev.expert)  # the expert in the compressed expert's place: scored as the expert is
    assert same["kl"] == pytest.approx(0, abs=1e-9)
    assert same["gain_retained"] == 1.0 and _gain_ci(same) == [1.0, 1.0]
    assert same["nll_text_sums_compressed"] == same["nll_text_sums_expert"]
    # the per-text sums add up to the perplexities the result reports
    assert _ppl(same["nll_text_sums_base"], same["nll_text_units_base"]) == pytest.approx(ev.ppl_base, rel=1e-6)
    assert _ppl(same["nll_text_sums_expert"], same["nll_text_units"]) == pytest.approx(ev.ppl_expert, rel=1e-6)
    assert len(same["nll_text_units"]) == 6 and same["nll_text_units"] == same["kl_text_tokens"]
    base = ev.score(ev._base_model)  # the base in its place keeps nothing
    assert base["gain_retained"] == pytest.approx(0, abs=1e-4)
    lo, hi = _gain_ci(base)
    assert -1e-3 < lo <= hi < 1e-3
    ref = ev.rounded_to_bf16()  # rounding an fp32 expert to bf16 moves it, a little
    lo, hi = _gain_ci(ref)
    assert lo <= ref["gain_retained"] <= hi and ref["gain_retained"] != 1.0 and hi - lo > 0
    assert _ppl(ref["nll_text_sums_compressed"], ref["nll_text_units"]) == pytest.approx(ref["ppl"], rel=1e-4)


def test_the_expert_runs_once_for_its_likelihood_and_every_comparison(evaluator):
    """The evaluator keeps the expert's log-probabilities: scoring two candidates after the expert's perplexity
    runs the expert's forward no more, and the figures are those of scoring it again each time."""
    ev = evaluator
    _ = ev.ppl_expert

    def scored_twice() -> tuple[list[dict], bool]:
        """Two candidates' figures, and whether the expert's own forward ran (not a copy's: copies keep hooks)."""
        calls = []
        hook = ev.expert.register_forward_hook(lambda module, *args: calls.append(module is ev.expert))
        try:
            return [ev.score(ev._base_model), ev.rounded_to_bf16()], any(calls)
        finally:
            hook.remove()

    kept, ran = scored_twice()
    assert not ran and len(ev._reference._kept) == 1 and ev._reference._bytes > 0
    ev._reference, reference = Scorer(ev.expert), ev._reference  # keeps nothing: the expert runs for each
    try:
        again, ran = scored_twice()
    finally:
        ev._reference = reference
    assert ran and kept == again


def test_targets_say_whether_the_interval_still_admits_the_gain_target():
    goal = TARGET_2BIT["min_gain_kept"]

    def row(gain, ci):
        return {"name": "e", "method": "meswitch", "bits": 2, "bits_per_param": 2.2, "kl": 0.001,
                "gain_kept_ppl": gain, "gain_kept_ppl_ci": ci, "gain_kept_task": None}  # fmt: skip

    cases = [  # (point, interval lower and upper bound - goal), (met by the point, by the whole interval, admitted)
        ((3, 1, 4), (True, True, True), "met, whole interval"),
        ((1, -2, 3), (True, False, True), "met by the point; interval reaches below"),
        ((-1, -4, 1), (False, False, True), "missed by the point; interval admits it"),
        ((-5, -8, -2), (False, False, False), "missed, whole interval below"),
    ]
    for offsets, verdicts, said in cases:
        gain, *ci = (round(goal + k / 1000, 4) for k in offsets)
        t = targets([row(gain, ci)])
        e = t["e"]["2bit"]
        assert (e["gain_met"], e["gain_ppl_met_with_interval"], e["gain_ppl_admitted_by_interval"]) == verdicts
        assert e["gain_kept_ppl_lo"] == ci[0]
        md = targets_markdown(t)
        assert f"{gain:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] / -" in md and f"| {said} |" in md
    older = targets([row(0.999, None)])["e"]["2bit"]  # a row from a report without per-text likelihoods
    assert older["gain_met"] and older["gain_ppl_met_with_interval"] is None
    assert "| 0.9990 / - | - |" in targets_markdown({"e": {"2bit": older, "1bit": older}})


def test_task_gain_gets_its_interval_and_its_own_verdict():
    base, expert = [1.0] * 24 + [0.0] * 176, [1.0] * 177 + [0.0] * 23
    compressed = [1.0] * 174 + [0.0] * 26
    figures = {"task_item_scores_base": base, "task_item_scores_expert": expert,
               "task_item_scores_compressed": compressed, "task_gain_retained": 0.9804}  # fmt: skip
    lo, hi = _task_gain_ci(figures)
    assert lo < 0.9804 < hi
    assert _task_gain_ci({**figures, "task_gain_retained": None}) is None  # no gain to keep: no interval
    assert _task_gain_ci({**figures, "task_item_scores_base": []}) is None  # a row of an older report
    row = {"name": "math", "method": "meswitch", "bits": 2, "bits_per_param": 2.3, "kl": 0.0001,
           "gain_kept_ppl": 0.9998, "gain_kept_ppl_ci": [0.9996, 1.0], "gain_kept_task": 0.9804,
           "gain_kept_task_ci": [lo, hi]}  # fmt: skip
    t = targets([row])["math"]["2bit"]
    assert not t["gain_met"] and t["gain_task_admitted_by_interval"] and not t["gain_task_met_with_interval"]
    md = targets_markdown(targets([row]))
    assert "ppl: met, whole interval; task: missed by the point; interval admits it" in md
    assert f"/ 0.980 [{lo:.3f}, {hi:.3f}]" in md
