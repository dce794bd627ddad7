"""Nested composition (an explicit AND of games) against mixing (an implicit OR).

    nested: one episode plays the chosen games in sequence, e.g. matrix -> tictactoe -> spy, as one
            continuing conversation for the learner; when a sub-game ends the next begins in the same
            dialogue, with a hand-over line. A failed sub-game does not stop the episode. The episode's
            return aggregates the sub-game returns R_k (each with its own invalid-reply penalties):
                mean (GIFT):  R = (1/K) sum_k R_k      min (strict AND):  R = min_k R_k
                product:      R = prod_k max(R_k, 0)
    mixed:  every episode is one game, drawn uniformly; each GRPO group holds one game.

`NestedGame` speaks the games' protocol, so the GRPO rollout loop plays it like any other game. The
learner is always seat 0 of a nested game; the other seats map onto each sub-game's other seats.

    python nested.py --compare    # single-game runs, mixed, nested at one budget; a GIFT-shaped table
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import games

NESTED_REWARDS = {"mean": lambda rs: sum(rs) / len(rs), "min": min,
                  "product": lambda rs: math.prod(max(r, 0.0) for r in rs)}


class NestedGame(games.Game):
    """Several games played one after another by the same learner, in one conversation."""
    name = "nested"

    def __init__(self, names: list[str], split: str = "train", reward: str = "mean", options: dict | None = None):
        if reward not in NESTED_REWARDS:
            raise ValueError(f"nested reward must be one of {', '.join(NESTED_REWARDS)}, got {reward!r}")
        if not 2 <= len(names) <= 16:
            raise ValueError("a nested game chains 2 to 16 games")
        super().__init__(split)
        self.names, self.reward_rule = list(names), reward
        self.subgames = [games.make(n, split=split, **(options or {}).get(n, {})) for n in names]
        self.num_seats = max(g.num_seats for g in self.subgames)

    def reset(self, seed: int) -> "NestedGame":
        self.seed, self.learner_seat, self.current = seed, 0, 0
        for k, g in enumerate(self.subgames):  # of the seed's parity: training and evaluation seeds stay apart
            g.reset(2 * (seed * 16 + k) + seed % 2)
        self.learner_moved = False  # has the learner replied in the current sub-game yet?
        self._sync()
        return self

    @property
    def game(self) -> games.Game:
        return self.subgames[self.current]

    def _seat_map(self) -> list[int]:
        """Nested seat -> sub-game seat: the learner's sub-game seat is nested seat 0."""
        g = self.game
        return [g.learner_seat] + [s for s in range(g.num_seats) if s != g.learner_seat]

    def _sync(self):
        """Move past finished sub-games (a failed one included) and mirror whose turn it is."""
        while self.game.done and self.current < len(self.subgames) - 1:
            self.current += 1
            self.learner_moved = False
        self.to_move = None if self.game.done else self._seat_map().index(self.game.to_move)

    def sub_rewards(self) -> list[float]:
        return [g.rewards[g.learner_seat] for g in self.subgames]

    @property
    def rewards(self) -> list[float]:
        """The learner's return aggregates the sub-games' (penalties included); other seats get 0."""
        if not self.done:
            return [0.0] * self.num_seats
        return [NESTED_REWARDS[self.reward_rule](self.sub_rewards())] + [0.0] * (self.num_seats - 1)

    @property
    def invalid(self) -> list[int]:
        return [sum(g.invalid[g.learner_seat] for g in self.subgames)] + [0] * (self.num_seats - 1)

    def outcome(self, seat: int) -> str:
        """'win' only if the learner won every sub-game."""
        return "win" if all(g.outcome(g.learner_seat) == "win" for g in self.subgames) else "loss"

    def step(self, seat: int, reply: str) -> bool:
        if self.done or seat != self.to_move:
            return False
        ok = self.game.step(self._seat_map()[seat], reply)
        self.learner_moved |= seat == 0
        self._sync()
        return ok

    def handover(self) -> str:
        """The line that closes the previous sub-game and opens the current one."""
        done = self.subgames[self.current - 1]
        result = {"win": "won", "draw": "drew", "loss": "lost"}[done.outcome(done.learner_seat)]
        return (f"[Game {self.current} of {len(self.subgames)} ({done.name}) is over: you {result}. "
                f"Game {self.current + 1} of {len(self.subgames)}: {self.game.name}.]\n")

    def prompt(self, seat: int) -> str:
        text = self.game.prompt(self._seat_map()[seat])
        if seat == 0 and self.current > 0 and not self.learner_moved:
            text = self.handover() + text
        return text

    def scripted_reply(self, seat: int) -> str:
        return self.game.scripted_reply(self._seat_map()[seat])

    def random_reply(self, seat: int) -> str:
        return self.game.random_reply(self._seat_map()[seat])

    def legal_replies(self, seat: int) -> list[str] | None:
        return self.game.legal_replies(self._seat_map()[seat])


# ------------------------------------------------------------------------------------ the comparison
def compare(argv=None):
    """Single-game runs, mixed and nested, from the same start with the same seed and the same budget of
    learner turns; then every model is evaluated on every game, on the train and the held-out split."""
    import grpo
    from policy import load_policy
    p = argparse.ArgumentParser(description="nested vs mixed at equal budgets")
    p.add_argument("--compare", action="store_true", help="run the comparison (required)")
    p.add_argument("--games", default="matrix,tictactoe,spy", help="comma-separated games, in nesting order")
    p.add_argument("--budget-turns", type=int, default=3000, help="learner turns each run may consume")
    p.add_argument("--eval-games", type=int, default=100, help="evaluation games per game and split")
    p.add_argument("--seed", type=int, default=0, help="the same seed for every run")
    p.add_argument("--runs-dir", default="runs/compare", help="where the runs go")
    p.add_argument("--train-args", default="", help="extra grpo.py arguments for every run, e.g. '--lr 1e-4'")
    args = p.parse_args(argv)
    if not args.compare:
        p.error("pass --compare to run the comparison")
    try:
        names = games.game_names(args.games)
    except ValueError as error:
        p.error(str(error))
    runs = {name: ["--games", name] for name in names}
    runs["mixed"] = ["--games", ",".join(names), "--mode", "mixed"]
    runs["nested"] = ["--games", ",".join(names), "--mode", "nested"]
    common = ["--budget-turns", str(args.budget_turns), "--steps", "100000", "--eval-games", "0",
              "--seed", str(args.seed), *args.train_args.split()]
    rows = {"warm start": evaluate_all(load_policy("tiny"), names, args)}
    consumed = {}
    for label, run_args in runs.items():
        run = grpo.parse_args([*run_args, *common, "--run-dir", f"{args.runs_dir}/{label}"])
        learner = grpo.train(run)
        consumed[label] = [json.loads(line) for line in open(run.run_dir / "metrics.jsonl")][-1]
        rows[label] = evaluate_all(learner, names, args)
    table = gift_table(rows, names)
    print(table)
    print("\nconsumed: " + "; ".join(f"{k}: {m['step']} steps, {m['total_episodes']} episodes, "
                                      f"{m['total_learner_turns']} turns, {m['total_learner_tokens']} tokens"
                                      for k, m in consumed.items()))
    Path(args.runs_dir, "comparison.md").write_text(table + "\n")
    return rows


def evaluate_all(policy, names, args) -> dict:
    import evaluate
    return {split: evaluate.score(policy, names, args.eval_games, split) for split in ("train", "test")}


def gift_table(rows: dict, names: list[str]) -> str:
    """Rows: training runs; columns: each game's success rate on the train and the held-out split."""
    head = "| trained on | " + " | ".join(f"{n} (train) | {n} (test)" for n in names) + " |"
    lines = [head, "|---" * (1 + 2 * len(names)) + "|"]
    for label, result in rows.items():
        cells = [f"{result[split][n]['win']:.0%}" for n in names for split in ("train", "test")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    compare()
