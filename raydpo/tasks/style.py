"""The synthetic style task on which online DPO was measured to work on 2 cores.

How it is shaped, in short (each choice was measured on the reference machine):

* prompt ``"about: {kw} | max {N}\\n"`` with kw one of ~110 nouns, N in 3..9;
* judge ``0.25 * ([kw in words] + len_credit + [ends with "."] + [please/thanks])``
  with a minimum length, so the degenerate one-word reply stops paying;
* SFT demonstrations meet each rule with probability 0.5 (the headroom comes
  from the mix), start with a space and put a noun first, so copying the
  keyword from prompt to response is one and the same BPE token.

Everything here is plain Python: no Ray, no torch.
"""

from __future__ import annotations

import random
import re

NOUNS = (
    "apple river cloud stone forest garden window candle bridge mountain "
    "ocean rabbit engine letter pencil castle island market basket mirror "
    "button lantern ladder meadow harbor valley desert violin piano rocket "
    "planet comet bottle blanket carpet pillow kettle teapot spoon fork "
    "wagon tractor bicycle helmet jacket scarf glove boot pocket wallet "
    "ticket camera signal tunnel tower palace temple cottage cabin barn "
    "fence gate path road street village city country kingdom empire "
    "dragon tiger lion eagle falcon sparrow salmon turtle dolphin whale "
    "spider beetle butterfly orchard vineyard wheat barley pepper onion "
    "garlic lemon cherry melon grape honey butter cheese bread cookie "
    "muffin pickle noodle soup salad sandwich chair table shelf drawer"
).split()

# Filler words never include a noun, so only the first word can match kw.
FILLER = "is was very quite so a the my our big small red blue old new fine good warm cold we see like love have find".split()
POLITE = ("please", "thanks")
MIN_N, MAX_N = 3, 9
PROMPT_RE = re.compile(r"^about: (\S+) \| max (\d+)\n$")


def make_prompt(kw: str, n: int) -> str:
    return f"about: {kw} | max {n}\n"


def parse_prompt(prompt: str) -> tuple[str, int]:
    m = PROMPT_RE.match(prompt)
    if not m:
        raise ValueError(f"not a style-task prompt: {prompt!r}")
    return m.group(1), int(m.group(2))


def words_of(response: str) -> list[str]:
    return [w.strip(".,!?").lower() for w in response.split() if w.strip(".,!?")]


def length_credit(n: int, limit: int) -> float:
    """n/3 below 3 words, 1 from 3 to `limit`, then falling by 1/4 per extra word."""
    if n < MIN_N:
        return n / MIN_N
    if n <= limit:
        return 1.0
    return max(0.0, 1.0 - (n - limit) / 4)


def rule_scores(prompt: str, response: str) -> dict[str, float]:
    """The four rule credits, each in [0, 1]."""
    kw, limit = parse_prompt(prompt)
    words = words_of(response)
    return {
        "keyword": float(kw in words),
        "length": length_credit(len(words), limit),
        "period": float(response.rstrip().endswith(".")),
        "polite": float(any(w in POLITE for w in words)),
    }


def score(prompt: str, response: str) -> float:
    """The judge: mean of the four rule credits, in [0, 1]."""
    return sum(rule_scores(prompt, response).values()) / 4


def split_prompts(seed: int = 0, n_eval: int = 256) -> tuple[list[str], list[str]]:
    """All (kw, N) prompts, split into (train, held-out eval) by a seeded shuffle."""
    combos = [make_prompt(kw, n) for kw in NOUNS for n in range(MIN_N, MAX_N + 1)]
    random.Random(seed).shuffle(combos)
    return combos[n_eval:], combos[:n_eval]


def demonstration(prompt: str, rng: random.Random) -> str:
    """A mixed-quality response: each of the four rules is met with p = 0.5."""
    kw, limit = parse_prompt(prompt)
    first = kw if rng.random() < 0.5 else rng.choice([w for w in NOUNS if w != kw])
    if rng.random() < 0.5:
        n = rng.randint(MIN_N, limit)
    else:
        n = rng.choice([1, 2] + list(range(limit + 1, limit + 7)))
    words = [first] + [rng.choice(FILLER) for _ in range(n - 1)]
    if rng.random() < 0.5:
        if len(words) == 1:
            words.append(rng.choice(POLITE))
        else:
            words[rng.randrange(1, len(words))] = rng.choice(POLITE)
    end = "." if rng.random() < 0.5 else rng.choice(["", "!"])
    return " " + " ".join(words) + end


def demonstrations(prompts: list[str], count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (prompt, response) SFT pairs drawn from `prompts`."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        p = rng.choice(prompts)
        out.append((p, demonstration(p, rng)))
    return out


def corpus(seed: int = 0, count: int = 4000) -> list[str]:
    """Text to train the tokenizer on: prompts followed by demonstrations."""
    train, held_out = split_prompts(seed)
    return [p + r for p, r in demonstrations(train + held_out, count, seed)]


def sft_records(count: int, seed: int = 0) -> list[dict]:
    """Mixed-quality SFT demonstrations on the training prompts, as records."""
    train, _ = split_prompts(seed)
    return [{"prompt": p, "completion": r} for p, r in demonstrations(train, count, seed)]


def preference_records(prompts: list[str], count: int, seed: int = 0, k: int = 4) -> list[dict]:
    """Synthetic offline pairs: k demonstrations per prompt, best vs worst by the
    judge; prompts whose best and worst tie are skipped."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        p = rng.choice(prompts)
        cands = sorted({demonstration(p, rng) for _ in range(k)}, key=lambda r: score(p, r))
        if len(cands) > 1 and score(p, cands[-1]) > score(p, cands[0]):
            out.append({"prompt": p, "chosen": cands[-1], "rejected": cands[0]})
    return out


def write_reward_data(run_dir, seed: int = 0) -> tuple[str, str]:
    """Synthetic preference pairs for a reward model: 2048 from training prompts and 256
    from held-out prompts, written (atomically) to <run_dir>/reward_{train,eval}.jsonl."""
    import json
    from pathlib import Path

    from raydpo.files import atomic_write

    train_prompts, held_out = split_prompts(seed)
    paths = []
    for name, prompts, n in (("train", train_prompts, 2048), ("eval", held_out, 256)):
        path = Path(run_dir) / f"reward_{name}.jsonl"
        atomic_write(path, (json.dumps(r) + "\n" for r in preference_records(prompts, n, seed)))
        paths.append(str(path))
    return paths[0], paths[1]
