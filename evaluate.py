"""Evaluation: how well a model plays, with 95% Wilson intervals, on seeds never used in training.

    python evaluate.py --baselines 1000     # win/draw/loss of random and scripted play, N seeded games each

Matrix: a "win" is a correct answer under SPEC.md's equilibrium rule. TicTacToe: the learner's seat against
the named opponent. Spy: the learner's side, among scripted (lexicon) players.
"""
from __future__ import annotations

import argparse
import math

from games import make, play

EVAL_SEED = 2_000_000_000  # evaluation seeds start here; training seeds stay far below


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(policy, names, n: int, split: str = "train", opponent: str = "random", temperature: float = 0.0,
          max_new_tokens: int = 24, batch_size: int = 64, seed: int = EVAL_SEED) -> dict[str, dict]:
    """Play n seeded games of each game with `policy` in the learner seat (scripted opponents; for
    TicTacToe the scripted `opponent`, or random when training used an LLM opponent)."""
    from grpo import is_llm_opponent, make_game, rollout
    opponent = "random" if is_llm_opponent(opponent) else opponent
    results = {}
    for name in names:
        episodes = [make_game(name, split, opponent).reset(seed + i) for i in range(n)]
        turns = 0
        # Similar prompt lengths share a batch, so little compute goes to padding.
        ordered = sorted(episodes, key=lambda g: len(g.prompt(g.to_move)))
        for start in range(0, n, batch_size):
            chunk = ordered[start:start + batch_size]
            batch = rollout(policy, chunk, temperature, max_new_tokens, seed=seed + start)
            turns += sum(m["role"] == "assistant" for msgs in batch.messages for m in msgs)
        outcomes = [g.outcome(g.learner_seat) for g in episodes]
        invalid = sum(g.invalid[g.learner_seat] for g in episodes)
        row = {"n": n, "turns": turns, "invalid": invalid / max(1, turns), "invalid_ci": wilson(invalid, turns)}
        for k in ("win", "draw", "loss"):
            row[k], row[f"{k}_ci"] = outcomes.count(k) / n, wilson(outcomes.count(k), n)
        if name == "spy":
            for role in ("civilian", "spy"):
                mine = [g for g in episodes if g.roles[g.learner_seat] == role]
                row[f"win_as_{role}"] = sum(g.outcome(g.learner_seat) == "win" for g in mine) / max(1, len(mine))
        results[name] = row
    return results


def before_after_table(before: dict | None, after: dict) -> str:
    lines = ["| game | before: win | after: win | after: draw | after: invalid replies |", "|---|---|---|---|---|"]
    for name, row in after.items():
        old = f"{before[name]['win']:.1%}" if before else "-"
        lo, hi = row["win_ci"]
        lines.append(f"| {name} | {old} | {row['win']:.1%} [{lo:.1%}, {hi:.1%}] | {row['draw']:.1%} | {row['invalid']:.1%} |")
    return "\n".join(lines)


def outcome_rates(outcomes: list[str]) -> dict[str, float]:
    return {k: outcomes.count(k) / len(outcomes) for k in ("win", "draw", "loss")}


def baseline_rows(n: int) -> list[tuple[str, str, dict[str, float]]]:
    """(game, setting, rates) over seeds 0..n-1 for random and scripted play."""
    rows = []
    for who in ("random", "scripted"):
        rows.append(("matrix", f"{who} answer", outcome_rates(
            [play(make("matrix").reset(i), [who]).outcome(0) for i in range(n)])))
    for learner, opponent in [("random", "random"), ("random", "expert"), ("expert", "random"), ("expert", "expert")]:
        outcomes = []
        for i in range(n):
            g = make("tictactoe", opponent="expert").reset(i)
            players = ["random"] * 2
            players[g.learner_seat] = "scripted" if learner == "expert" else "random"
            players[1 - g.learner_seat] = "scripted" if opponent == "expert" else "random"
            outcomes.append(play(g, players).outcome(g.learner_seat))
        rows.append(("tictactoe", f"{learner} vs {opponent}", outcome_rates(outcomes)))
    for civilians, spy in [("random", "random"), ("scripted", "random"), ("random", "scripted"), ("scripted", "scripted")]:
        outcomes = []
        for i in range(n):
            g = make("spy").reset(i)
            play(g, [spy if s == g.spy else civilians for s in range(4)])
            outcomes.append(g.outcome((g.spy + 1) % 4))
        rows.append(("spy", f"{civilians} civilians vs {spy} spy", outcome_rates(outcomes)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baselines", type=int, default=1000, metavar="N", help="seeded games per setting")
    args = parser.parse_args()
    print(f"{'game':<11}{'setting (win = learner / civilian side)':<40}{'win':>7}{'draw':>7}{'loss':>7}")
    for game, setting, rates in baseline_rows(args.baselines):
        print(f"{game:<11}{setting:<40}" + "".join(f"{rates[k]:>7.1%}" for k in ("win", "draw", "loss")))


if __name__ == "__main__":
    main()
