"""Evaluation: how well players do at the games.

For now this holds the reference baselines of play without a language model, so every later figure has
something to be compared with:

    python evaluate.py --baselines 1000     # win/draw/loss of random and scripted play, N seeded games each

Matrix: a "win" is a correct answer under SPEC.md's equilibrium rule. TicTacToe: the learner's seat against
the named opponent. Spy: the civilians' side, with scripted (lexicon) or random-describing players.
"""
from __future__ import annotations

import argparse

from games import make, play


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
