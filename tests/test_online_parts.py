"""The online loop's parts that need no vLLM: pair building, win-rate counting,
the mailbox between driver and trainer workers, the report."""

import asyncio
import json

import pytest

from raydpo.judge.client import JudgeClient, JudgeTally, WinRate, copeland_scores, win_rate
from raydpo.online.pairs import PairCounts, build_pairs, counts_row
from raydpo.records import JudgeInfo, Judgement, Sample
from raydpo.report import read_metrics, table, write_report
from raydpo.tasks import style
from raydpo.train.online import Mailbox

P = "about: apple | max 5\n"


def group(texts, version=3, prompt=P):
    return [Sample(0, j, prompt, t, (1,), (0.0,), "stop", version) for j, t in enumerate(texts)]


def test_best_vs_worst_with_ties_and_identical_texts_dropped_and_counted():
    groups = [group([" a", " b", " c", " d"]), group([" x", " x", " x", " x"]), group([" p", " q", " q", " p"]),
              group([" m", " n", " o", " m"])]
    scores = [[0.2, 0.9, 0.5, 0.1], [0.5, 0.5, 0.5, 0.5], [0.3, 0.6, 0.6, 0.3], [0.7, 0.2, 0.4, 0.7]]
    pairs, c = build_pairs(groups, scores, iteration=4, first_prompt=10, judge="rule:x")
    # group 0: best b (0.9) vs worst d (0.1); group 1: all tie; group 2: best q (first of the 0.6s,
    # index 1) vs worst p (the last of the 0.3s, index 3); group 3: best m (index 0, ties broken by the lower index) vs worst n
    assert [(p.chosen, p.rejected) for p in pairs] == [(" b", " d"), (" q", " p"), (" m", " n")]
    assert [p.pair_id for p in pairs] == ["it000004-p000010-s1-3", "it000004-p000012-s1-3", "it000004-p000013-s0-1"]
    assert all(p.policy_version == 3 and p.iteration == 4 and p.judge == "rule:x" for p in pairs)
    assert (c.prompts, c.samples, c.pairs, c.ties, c.identical) == (4, 16, 3, 1, 0)
    assert pairs[0].chosen_score == 0.9 and pairs[0].rejected_score == 0.1


def test_identical_best_and_worst_texts_are_not_a_pair():
    # different scores for the same text cannot come from a deterministic judge, but a
    # sampled judge can do it; the pair would teach nothing
    pairs, c = build_pairs([group([" a", " a"])], [[0.9, 0.1]], iteration=1, first_prompt=0, judge="j")
    assert pairs == [] and c.identical == 1


def test_all_pairs_above_a_margin():
    g = group([" a", " b", " c"])
    pairs, c = build_pairs([g], [[0.9, 0.5, 0.45]], iteration=1, first_prompt=0, judge="j", mode="all",
                           pair_margin=0.1)
    # a>b (0.4), a>c (0.45) kept; b>c (0.05) below the margin
    assert sorted((p.chosen, p.rejected) for p in pairs) == [(" a", " b"), (" a", " c")]
    assert c.below_margin == 1 and c.ties == 0


def test_tie_margin_drops_close_pairs():
    pairs, c = build_pairs([group([" a", " b"])], [[0.55, 0.5]], iteration=1, first_prompt=0, judge="j",
                           tie_margin=0.05)
    assert pairs == [] and c.ties == 1


def test_samples_of_two_versions_in_one_group_are_an_error():
    g = group([" a", " b"])
    g[1] = Sample(0, 1, P, " b", (1,), (0.0,), "stop", 4)
    with pytest.raises(ValueError, match=r"several policy versions \[3, 4\]"):
        build_pairs([g], [[0.1, 0.9]], iteration=1, first_prompt=0, judge="j")


def test_pair_counts_add():
    a, b = PairCounts(1, 4, 1, 0, 0, 0, 0), PairCounts(2, 8, 1, 1, 0, 0, 2)
    a.add(b)
    assert (a.prompts, a.samples, a.pairs, a.ties, a.invalid) == (3, 12, 2, 1, 2)


class _Done:  # what a DeploymentHandle call returns
    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        return self.value


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Done(self.fn(*args))


class RuleHandle:
    """The rule judge app's handle API, answered in place on the style rule (or always "a")."""

    def __init__(self, always_a=False):
        from raydpo.judge.rules import compare_scores

        self.info = _Method(lambda: JudgeInfo("rule:style", "rule", pairwise=False))
        self.compare_items = _Method(lambda items: [
            Judgement("a", 1.0) if always_a else compare_scores(style.score(p, a), style.score(p, b))
            for p, a, b in items])


def ScoringJudge(always_a=False):
    """JudgeClient over the rule app's handle API: asked in both orders, as in the loop."""
    return JudgeClient(RuleHandle(always_a))


def test_win_rate_counts_ties_half():
    good, bad = " apple is fine please.", " stone"
    prompts = [P, P]
    # prompt 0: the good response beats bad, ties good; prompt 1: bad loses to good, ties bad
    r = win_rate(ScoringJudge(), prompts, [good, bad], [[bad, good], [good, bad]])
    assert r == WinRate(win_rate=(1 + 0.5 + 0 + 0.5) / 4, wins=1, ties=2, losses=1, invalid=0,
                        tally=JudgeTally(compared=4, consistent=4, ties=2))  # scores do not depend on position


def test_a_judge_that_always_says_a_gives_only_ties():
    r = win_rate(ScoringJudge(always_a=True), [P], [" stone"], [[" apple is fine please."] * 3])
    assert (r.wins, r.ties, r.losses, r.win_rate) == (0, 3, 0, 0.5)
    assert (r.tally.compared, r.tally.consistent, r.tally.ties) == (3, 0, 3)  # "a" both ways: never consistent
    assert r.tally.row("eval_judge_")["eval_judge_consistency"] == 0.0


def test_a_pairwise_judges_quality_and_cost_are_tallied_per_chunk_and_survive_a_resume():
    """Verdicts of a pairwise app (both orders parsed, a remote judge's usage) -> JudgeTally ->
    PairCounts (as stored with each chunk) -> the metrics row."""
    answers = {("x", " 1", " 2"): Judgement("a", 1.0, parsed=("a", "b"), calls=2, retries=1, prompt_tokens=40,
                                            completion_tokens=2, cost=0.5),
               ("x", " 1", " 3"): Judgement("tie", 0.0, parsed=("a", "a"), calls=1, cached=1, prompt_tokens=20,
                                            completion_tokens=1, cost=0.25),
               ("x", " 2", " 3"): Judgement("invalid", 0.0, parsed=("invalid", "b"), cached=2)}
    handle = RuleHandle()
    handle.info = _Method(lambda: JudgeInfo("openai:m", "openai", pairwise=True))
    handle.compare_items = _Method(lambda items: [answers[it] for it in items])
    tally = JudgeTally()
    scores = JudgeClient(handle).rank([[("x", " 1"), ("x", " 2"), ("x", " 3")]], tally=tally)
    assert scores == [[0.75, 0.0, 0.5]]  # Copeland: the invalid comparison left out for both
    assert tally == JudgeTally(compared=3, consistent=1, ties=1, invalid=1, calls=3, cached=3, retries=1,
                               prompt_tokens=60, completion_tokens=3, cost=0.75)
    from dataclasses import asdict

    stored = json.loads(json.dumps(asdict(PairCounts(prompts=1, invalid=1, judge=asdict(tally)))))  # chunk metadata
    counts = PairCounts(**stored)
    counts.add(PairCounts(**stored))
    counts.add(PairCounts(prompts=1))  # a chunk stored before judge tallies existed
    row = counts_row(counts)
    assert (row["judge_consistency"], row["judge_tie_rate"], row["judge_invalid_rate"]) == (1 / 3, 1 / 3, 1 / 3)
    assert (row["judge_calls"], row["judge_cache_hits"], row["judge_retries"], row["judge_cost"]) == (6, 6, 2, 1.5)
    assert row["invalid_comparisons"] == 2 and row["judge_prompt_tokens"] == 120 and row["judge_cache_misses"] == 6
    assert counts_row(PairCounts())["judge_consistency"] is None  # a scoring judge ranks without comparing


def test_mailbox_orders_commands_and_keeps_the_first_reply():
    async def go():
        mb = Mailbox()
        assert await mb.next(0, timeout_s=0.05) is None  # nothing posted yet: times out, no error
        waiter = asyncio.ensure_future(mb.next(0, timeout_s=5))
        await asyncio.sleep(0.01)
        assert await mb.post({"op": "train", "iteration": 1}) == 0
        assert (await waiter)["iteration"] == 1  # a waiting worker is woken by the post
        assert await mb.post({"op": "stop"}) == 1
        assert (await mb.next(1, 1))["op"] == "stop"
        await mb.reply(0, {"v": 1})
        await mb.reply(0, {"v": 2})  # a restarted worker answering again
        assert await mb.result(0, 1) == {"v": 1}
        assert await mb.result(1, 0.05) is None

    asyncio.run(go())


def test_report_table_plot_and_summary(tmp_path):
    rows = [{"iteration": i, "pairs": 0 if i == 0 else 60, "win_rate": 0.5 + 0.1 * i, "judge_score": 0.6 + 0.05 * i,
             "response_tokens": 9.0, "kl": 0.5 * i, "reward_accuracy": 0.8, "reward_margin": 0.2,
             **{f"time_{k}": 1.0 for k in ("sample", "judge", "store", "train", "sync", "eval", "other")},
             "time_total": 7.0} for i in range(3)]
    rows[0].pop("reward_accuracy")
    with open(tmp_path / "online_metrics.jsonl", "w") as f:
        for r in rows + [{**rows[2], "win_rate": 0.75}]:  # a re-run iteration: the last row wins
            f.write(json.dumps(r) + "\n")
    got = read_metrics(tmp_path)
    assert [r["iteration"] for r in got] == [0, 1, 2] and got[2]["win_rate"] == 0.75
    md = write_report(tmp_path).read_text()
    assert "0.500 -> **0.750** after iteration 2" in md
    assert "judged pairs stored: 120" in md
    assert "| 0 | 0 | 0.500 | 0.600 | 9.0 | 0.00 | - |" in table(got)  # a missing value prints "-"
    assert (tmp_path / "report" / "metrics.png").stat().st_size > 10_000
    assert "| iter | consistency | tie rate | invalid rate |\n" in md  # a local judge: no cost columns


def test_the_report_shows_the_judges_quality_and_what_a_remote_judge_cost(tmp_path):
    rows = [{"iteration": 0, "win_rate": 0.5, "eval_judge_consistency": 0.75, "eval_judge_tie_rate": 0.25,
             "eval_judge_invalid_rate": 0.0, "eval_judge_calls": 10, "eval_judge_cost": 0.01},
            {"iteration": 1, "win_rate": 0.6, "pairs": 3, "eval_judge_consistency": 0.5, "eval_judge_tie_rate": 0.5,
             "eval_judge_invalid_rate": 0.125, "eval_judge_calls": 8, "eval_judge_cache_hits": 2, "judge_calls": 30,
             "judge_retries": 4, "judge_prompt_tokens": 900, "judge_completion_tokens": 30, "eval_judge_prompt_tokens": 70,
             "judge_cost": 0.1, "eval_judge_cost": 0.02}]
    with open(tmp_path / "online_metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    md = write_report(tmp_path).read_text()
    assert "- judge calls (retries not counted): 48, 2 answered from the cache, cost 0.1300" in md
    assert "| 0 | 0.750 | 0.250 | 0.000 | 10 | 0 | 0 | 0 | 0.0100 |" in md
    assert "| 1 | 0.500 | 0.500 | 0.125 | 38 | 2 | 4 | 1000 | 0.1200 |" in md


def test_copeland_scores_rank_samples_from_pairwise_verdicts():
    # 0 beats 1 and 2; 1 ties 2; 3 is compared once unparseably, and beats 1 and 2:
    # the invalid comparison counts for neither side, so 0 and 3 both won all they could
    verdicts = {(0, 1): "a", (0, 2): "a", (1, 2): "tie", (0, 3): "invalid", (1, 3): "b", (2, 3): "b"}
    assert copeland_scores(4, verdicts) == [1.0, 0.5 / 3, 0.5 / 3, 1.0]
    # best vs worst on these scores: 0 (first of the 1.0s) vs 2 (last of the lowest)
    pairs, c = build_pairs([group([" a", " b", " c", " d"])], [copeland_scores(4, verdicts)], iteration=1,
                           first_prompt=0, judge="llm:x")
    assert [(p.chosen, p.rejected) for p in pairs] == [(" a", " c")]


def test_unparseable_verdicts_do_not_count_as_losses():
    # 2 wins its only valid comparison (against 4); its other three are unparseable. 0 wins
    # 2 of 3. Counting an invalid verdict as a loss for both would rank 4 (3 wins) best and 2
    # behind 0; over valid comparisons only, 2 is best. 3 loses everything it was judged on.
    verdicts = {(0, 1): "a", (0, 2): "invalid", (0, 3): "a", (0, 4): "b", (1, 2): "invalid", (1, 3): "a",
                (1, 4): "b", (2, 3): "invalid", (2, 4): "a", (3, 4): "b"}
    scores = copeland_scores(5, verdicts)
    assert scores == [2 / 3, 1 / 3, 1.0, 0.0, 0.75]
    pairs, _ = build_pairs([group([" a", " b", " c", " d", " e"])], [scores], iteration=1, first_prompt=0,
                           judge="llm:x")
    assert [(p.chosen, p.rejected) for p in pairs] == [(" c", " d")]


def test_a_sample_the_judge_never_ranked_is_left_out():
    verdicts = {(0, 1): "a", (0, 2): "invalid", (1, 2): "invalid"}
    scores = copeland_scores(3, verdicts)
    assert scores[:2] == [1.0, 0.0] and scores[2] != scores[2]  # NaN
    pairs, c = build_pairs([group([" a", " b", " c"])], [scores], iteration=1, first_prompt=0, judge="llm:x")
    assert [(p.chosen, p.rejected) for p in pairs] == [(" a", " b")] and c.unranked == 1


def test_an_iteration_trained_before_a_kill_gets_the_row_an_uninterrupted_run_writes(tmp_path):
    """A driver stopped after the trainer replied but before the iteration's metrics row was
    written: the resumed run rebuilds that row from what was saved with the pairs and the
    weights (judging counts in the chunks' metadata, the reply in the checkpoint), with the
    same values an uninterrupted run wrote. Before the fix it held only `pairs`."""
    from raydpo.config_io import load_config
    from raydpo.data.store import PreferenceStore, StoredPair
    from raydpo.online.pairs import counts_row
    from raydpo.online.resume import trained_row
    from raydpo.online.training_data import dpo_metrics, training_table

    def pair(i, reason):
        return StoredPair(f"3-{i}", 3, 2, "online", "p", "c", "r", 1.0, 0.0, "rule", (5, 6), (7, 8, 2), (9, 10),
                          "stop", reason, (-0.1, -0.2, -0.3), (-0.4, -0.5))

    cfg = load_config(None, [f"run_dir={tmp_path}", "loop.truncated=keep"])
    store = PreferenceStore(tmp_path / "preferences")
    judged = [PairCounts(prompts=4, samples=16, pairs=2, ties=1, identical=1),
              PairCounts(prompts=4, samples=16, pairs=1, ties=2, invalid=3, unranked=1)]
    store.write_chunk(3, 0, [pair(0, "stop"), pair(1, "length")], counts=judged[0].__dict__)
    store.write_chunk(3, 1, [pair(2, "length")], counts=judged[1].__dict__)
    reply = {"steps": 6, "pairs": 3, "step": 40, "metrics": {"loss": 0.61, "rewards/accuracies": 0.75,
                                                               "rewards/margins": 0.2, "kl_estimate": 0.05}}
    ckpt = tmp_path / "ray_train" / "online" / "iter-000003"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"iteration": 3, "reply": reply}))

    total = PairCounts()
    for c in judged:
        total.add(c)
    uninterrupted = {**counts_row(total), **training_table(cfg, store, 3)[1], "train_steps": 6, "trained_pairs": 3,
                     **dpo_metrics(reply["metrics"])}
    row = trained_row(cfg, store, tmp_path, 3)
    assert row == uninterrupted
    assert row["pairs"] == 3 and row["ties_dropped"] == 3 and row["samples"] == 32 and row["truncated_pairs"] == 2
    assert row["train_steps"] == 6 and row["dpo_loss"] == 0.61 and row["reward_accuracy"] == 0.75


def test_a_resume_that_tightens_max_staleness_reports_what_the_trained_iteration_kept(tmp_path):
    """Iteration 3 trained at loop.max_staleness=1 on pairs of versions 1 and 2, and the driver
    died before writing its row; the resume runs with max_staleness=0 (allowed). The rebuilt
    row reports what that training kept, saved with its reply: no drops, 2 pairs one version
    behind. Read again under the new bound, the store would say 2 were dropped as too stale,
    beside trained_pairs=3."""
    from raydpo.config_io import load_config
    from raydpo.data.store import PreferenceStore, StoredPair
    from raydpo.online.resume import trained_row
    from raydpo.online.training_data import training_table

    def pair(i, version):
        return StoredPair(f"3-{i}", 3, version, "online", "p", "c", "r", 1.0, 0.0, "rule", (5, 6), (7, 8, 2), (9, 10),
                          "stop", "stop", (-0.1, -0.2, -0.3), (-0.4, -0.5))

    then, now = (load_config(None, [f"run_dir={tmp_path}", f"loop.max_staleness={k}"]) for k in (1, 0))
    store = PreferenceStore(tmp_path / "preferences")
    store.write_chunk(3, 0, [pair(0, 2), pair(1, 1), pair(2, 1)], counts=PairCounts(prompts=3, samples=12, pairs=3).__dict__)
    kept = training_table(then, store, 3)[1]
    assert kept["stale_dropped"] == 0 and kept["staleness_hist"] == [1, 2]
    assert training_table(now, store, 3)[1]["stale_dropped"] == 2  # what a re-read would report
    ckpt = tmp_path / "ray_train" / "online" / "iter-000003"
    ckpt.mkdir(parents=True)
    reply = {"steps": 4, "pairs": 3, "step": 20, "metrics": {"loss": 0.6}, "kept": kept}
    (ckpt / "trainer_state.json").write_text(json.dumps({"iteration": 3, "reply": reply}))

    row = trained_row(now, store, tmp_path, 3)
    assert row["stale_dropped"] == 0 and row["staleness_hist"] == [1, 2] and row["trained_pairs"] == 3


def test_a_costed_scoring_judges_cost_is_tallied_when_it_ranks():
    """A rubric judge (judge.remote.mode=pointwise) scores; what each score cost comes with it."""
    handle = RuleHandle()
    handle.info = _Method(lambda: JudgeInfo("openai:m", "openai", pairwise=False, costed=True))
    handle.score_items_costed = _Method(lambda items: [
        (float(len(r)), {"calls": 1, "retries": len(r) % 2, "prompt_tokens": 10, "completion_tokens": 1, "cost": 0.5})
        for _, r in items])
    handle.score_items = _Method(lambda items: [float(len(r)) for _, r in items])
    client, tally = JudgeClient(handle), JudgeTally()
    assert client.rank([[("x", " ab"), ("x", " a")], [("y", " abc")]], tally=tally) == [[3.0, 2.0], [4.0]]
    assert tally == JudgeTally(calls=3, retries=1, prompt_tokens=30, completion_tokens=3, cost=1.5)
    assert client.score([("x", " a")]) == [2.0]  # no tally asked for: the plain route


def test_the_reference_scored_once_an_iteration_is_the_live_reference_pair_by_pair(tiny_model_dir, tiny_tokenizer):
    """The online trainer scores an iteration's pairs with the frozen reference once, in
    batches of similar length (`_with_reference`), and its passes read those log-probs instead
    of running the reference each step. A second implementation: each pair scored alone (no
    padding), in both layouts."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from raydpo.data.collate import REFERENCE_COLUMNS, layout
    from raydpo.train.online import _with_reference
    from raydpo.train.step import frozen_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rng, words = np.random.default_rng(0), [" apple", " river", " stone", " please", " thanks"]
    enc = lambda text: tiny_tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    rows = {"pair_id": [f"p{i}" for i in range(37)],
            "prompt_ids": [enc(f"about: {words[i % 5].strip()} | max {3 + i % 7}\n") for i in range(37)],
            "chosen_ids": [enc("".join(rng.choice(words, 1 + i % 9))) for i in range(37)],
            "rejected_ids": [enc("".join(rng.choice(words, 1 + (5 * i) % 11))) for i in range(37)]}
    pad = tiny_tokenizer.pad_token_id
    for shared in (True, False):
        lay = layout(shared)
        learner = SimpleNamespace(reference=model, layout=lay, pad_id=pad, device=torch.device("cpu"),
                                  autocast=nullcontext())
        got = _with_reference(learner, rows, batch=8)
        assert {k: got[k] for k in rows} == rows  # the rows themselves, in their order
        for i in range(37):
            rc, rr = frozen_logps(model, lay.collate({k: [rows[k][i]] for k in rows if k != "pair_id"}, pad))
            assert got[REFERENCE_COLUMNS[0]][i] == pytest.approx(float(rc[0]), abs=1e-4)
            assert got[REFERENCE_COLUMNS[1]][i] == pytest.approx(float(rr[0]), abs=1e-4)
