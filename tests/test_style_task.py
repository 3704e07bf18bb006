"""The style task's judge, checked against hand-worked scores."""


import pytest

from raydpo.tasks import style


@pytest.mark.parametrize(
    "response, expected",
    [
        # kw=apple, N=5.  keyword + length + period + polite, each /4
        (" apple is red please.", (1 + 1 + 1 + 1) / 4),  # 4 words <= 5: full length credit
        (" apple.", (1 + 1 / 3 + 1 + 0) / 4),  # 1 word: length credit 1/3
        (" please.", (0 + 1 / 3 + 1 + 1) / 4),  # the degenerate reply no longer pays fully
        (" apple a b c d e f thanks", (1 + 0.25 + 0 + 1) / 4),  # 8 words: 1 - (8-5)/4
        (" pear a b c d e f g h i!", (0 + 0 + 0 + 0) / 4),  # 10 words: clipped at 0
        (" Apple, Thanks!", (1 + 2 / 3 + 0 + 1) / 4),  # case and punctuation stripped
    ],
)
def test_score_hand_worked(response, expected):
    assert style.score("about: apple | max 5\n", response) == pytest.approx(expected)


def test_bad_prompt_is_named():
    with pytest.raises(ValueError, match="not a style-task prompt"):
        style.score("hello", " x")


def test_split_is_disjoint_and_seeded():
    train, held = style.split_prompts(seed=0)
    assert len(held) == 256 and not set(train) & set(held)
    assert len(train) + len(held) == len(style.NOUNS) * (style.MAX_N - style.MIN_N + 1)
    assert style.split_prompts(seed=0) == (train, held)


def test_demonstrations_are_mixed_quality():
    train, _ = style.split_prompts()
    demos = style.demonstrations(train, 4000, seed=1)
    rates = {k: sum(style.rule_scores(p, r)[k] == 1.0 for p, r in demos) / len(demos) for k in ("keyword", "period", "polite")}
    for rule, rate in rates.items():  # each rule met about half the time: headroom for DPO
        assert 0.44 < rate < 0.56, (rule, rate)
    assert all(r.startswith(" ") and r.split()[0].strip(".!") in style.NOUNS for _, r in demos)
    assert style.demonstrations(train, 10, seed=1) == demos[:10]
