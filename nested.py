"""What a GRPO step plays: nested episodes (an explicit AND of games) or mixed ones (an OR).

    nested: one episode plays the chosen games in sequence, e.g. matrix -> tictactoe -> spy, as one
            continuing conversation for the learner, a hand-over line between sub-games; a failed
            sub-game does not stop the episode. Its return aggregates the sub-games' returns R_k
            (penalties included):
                mean (GIFT):  R = (1/K) sum_k R_k      min (strict AND):  R = min_k R_k
            Causal credit (grpo.py's default with the mean): a reply in sub-game k is credited with
            (1/K) sum_{j>=k} R_j, the part of the mean it can still change.
    mixed:  every episode is one game, drawn uniformly; each GRPO group holds one game.

`NestedGame` speaks the games' protocol, so the rollout plays it like any other game; the learner is
its seat 0. `step_instances` is the one place where nested and mixed differ; `random_transcripts`
writes random-legal play, what SFT starts a model from (policy.py).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import games

NESTED_REWARDS = {"mean": lambda rs: sum(rs) / len(rs), "min": min}


class NestedGame(games.Game):
    name = "nested"

    def __init__(self, names: list[str], split: str = "train", reward: str = "mean",
                 options: dict | None = None):
        if reward not in NESTED_REWARDS:
            raise ValueError(f"nested reward must be one of {', '.join(NESTED_REWARDS)}, "
                             f"got {reward!r}")
        if not 2 <= len(names) <= 16:
            raise ValueError("a nested game chains 2 to 16 games")
        super().__init__(split)
        self.reward_rule = reward
        self.subgames = [games.make(n, split=split, **(options or {}).get(n, {})) for n in names]
        self.num_seats = max(g.num_seats for g in self.subgames)

    def reset(self, seed: int) -> "NestedGame":
        self.seed, self.learner_seat, self.current = seed, 0, 0
        # Sub-game seeds keep the seed's parity: training and evaluation seeds stay apart.
        for k, g in enumerate(self.subgames):
            g.reset(2 * (seed * 16 + k) + seed % 2)
        self.learner_moved = False  # has the learner replied in the current sub-game yet?
        self.learner_turns = []     # the sub-game of each learner reply, in order (causal credit)
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
        if not self.done:
            return [0.0] * self.num_seats
        return [NESTED_REWARDS[self.reward_rule](self.sub_rewards())] + [0.0] * (self.num_seats - 1)

    def returns_to_go(self) -> list[float]:
        """Per sub-game k, (1/K) sum_{j >= k} R_j: the part of the mean return that a reply in
        sub-game k can still change (causal credit drops terms whose expected gradient is zero);
        normalised per part in its group (grpo.py), each part weighs alike."""
        if self.reward_rule != "mean":
            raise ValueError(f"causal credit needs the mean nested reward, not "
                             f"{self.reward_rule!r}")
        rs = self.sub_rewards()
        return [sum(rs[k:]) / len(rs) for k in range(len(rs))]

    @property
    def invalid(self) -> list[int]:
        return [sum(g.invalid[g.learner_seat] for g in self.subgames)] + [0] * (self.num_seats - 1)

    def outcome(self, seat: int) -> str:
        return "win" if all(g.outcome(g.learner_seat) == "win" for g in self.subgames) else "loss"

    def step(self, seat: int, reply: str) -> bool:
        if self.done or seat != self.to_move:
            return False
        if seat == 0:
            self.learner_turns.append(self.current)
        ok = self.game.step(self._seat_map()[seat], reply)
        self.learner_moved |= seat == 0
        self._sync()
        return ok

    def handover(self) -> str:
        """The line that closes the previous sub-game and opens the current one."""
        done = self.subgames[self.current - 1]
        result = {"win": "won", "draw": "drew", "loss": "lost"}[done.outcome(done.learner_seat)]
        k, n = self.current, len(self.subgames)
        return (f"[Game {k} of {n} ({done.name}) is over: you {result}. "
                f"Game {k + 1} of {n}: {self.game.name}.]\n")

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

    def random_replies(self, seat: int) -> list[str]:
        return self.game.random_replies(self._seat_map()[seat])


# ------------------------------------------------------------------------------- what a step plays
def is_llm_opponent(spec: str) -> bool:
    return spec == "self" or spec.startswith("model:")


def check_opponent(spec: str):
    if is_llm_opponent(spec) and spec != "model:":
        return
    try:
        games.opponent_randomness(spec)
    except ValueError:
        raise ValueError("--opponent must be random, expert, eps:P, eps:P-Q (0<=P<=Q<=1), self or "
                         f"model:PATH; got {spec!r}") from None


def make_game(name: str, split: str = "train", opponent: str = "random",
              reward: str = "mean") -> games.Game:
    """A game by name; "matrix>tictactoe>spy" is a nested game of those games in that order.
    TicTacToe's scripted seat plays `opponent` (random, expert or eps:P; random where language
    models play the other seats: self or model:PATH)."""
    options = {"tictactoe": {"opponent": "random" if is_llm_opponent(opponent) else opponent}}
    if ">" in name:
        return NestedGame(name.split(">"), split, reward, options)
    return games.make(name, split=split, **options.get(name, {}))


def step_instances(names: list[str], mode: str, run_seed: int, step: int,
                   n: int) -> list[tuple[str, int]]:
    """The n (game name, seed) instances of a training step, a pure function of the run's seed and
    the step (a resumed run replays the same games)."""
    rng = random.Random(f"{run_seed}:{step}")
    chosen = [">".join(names) if mode == "nested" else rng.choice(names) for _ in range(n)]
    return [(name, games.train_seed(run_seed, step, i)) for i, name in enumerate(chosen)]


def results(episode: games.Game) -> list[tuple[str, str, int]]:
    """(game, the learner's outcome, its invalid replies) for each game an episode played: one for a
    single game, one per sub-game of a nested one."""
    played = getattr(episode, "subgames", [episode])
    return [(g.name, g.outcome(g.learner_seat), g.invalid[g.learner_seat]) for g in played]


def credit(episode: games.Game, causal: bool) -> tuple[list[int] | None, list[float]]:
    """What each learner reply of a finished episode is credited with: the part (sub-game) of each
    reply (None: all part 0) and each part's return, part 0's the learner's return. Causal credit
    of a nested episode: sub-game k's return-to-go (returns_to_go)."""
    if causal and isinstance(episode, NestedGame):
        return list(episode.learner_turns), episode.returns_to_go()
    return None, [episode.rewards[episode.learner_seat]]


def game_stats(played: list[tuple[str, str, int]]) -> dict[str, float]:
    """Per game, over the `results` of a step's episodes: the learner's win/draw/loss rates and its
    invalid replies per game played."""
    stats = {}
    for name in sorted({r[0] for r in played}):
        mine = [r for r in played if r[0] == name]
        for outcome in ("win", "draw", "loss"):
            stats[f"{name}/{outcome}"] = sum(r[1] == outcome for r in mine) / len(mine)
        stats[f"{name}/invalid"] = sum(r[2] for r in mine) / len(mine)
    return stats


def random_transcripts(path: Path, n_per_game: int, seed: int = 0, n_nested: int = 0, step: int = 0,
                       mistakes: float = 0.0) -> Path:
    """Random-legal play of every game, the learner seat's view as chat JSONL (HF format), then
    `n_nested` nested episodes (all games, a random order each); game i has the training seed
    train_seed(seed, step, i). meta["choices"] lists, per learner turn, the replies random play drew
    from (Game.random_replies) and meta["free"] where they were free text. `mistakes`: the chance
    that a turn with listed choices first gets another game's choice or a taken one (its
    meta["choices"] None), so that a retry prompt follows."""
    order, errs = random.Random(seed), random.Random(f"{seed} mistakes")
    plan = [(name, i) for name in games.GAMES for i in range(n_per_game)]
    plan += [(None, i) for i in range(n_nested)]
    with open(path, "w") as f:
        for name, i in plan:
            game_seed = games.train_seed(seed, step, i)
            if name is None:
                chain = order.sample(list(games.GAMES), len(games.GAMES))
                name, g = ">".join(chain), NestedGame(chain).reset(game_seed)
            else:
                g = games.make(name).reset(game_seed)
            messages, choices, free = [], [], []
            while not g.done:
                seat = g.to_move
                if seat != g.learner_seat:
                    g.step(seat, g.scripted_reply(seat))
                    continue
                legal = g.legal_replies(seat)
                if legal and mistakes and errs.random() < mistakes:
                    wrong = errs.choice([r for r in map(games.answer, games.CHOICES)
                                         if r not in legal])
                    messages += [{"role": "user", "content": g.prompt(seat)},
                                 {"role": "assistant", "content": wrong}]
                    choices.append(None)
                    free.append(False)
                    if g.step(seat, wrong):
                        raise AssertionError(f"{g.name} accepted {wrong!r}, not a legal reply")
                choices.append(g.random_replies(seat))
                free.append(legal is None)
                reply = g.random_reply(seat)
                messages += [{"role": "user", "content": g.prompt(seat)},
                             {"role": "assistant", "content": reply}]
                g.step(seat, reply)
            meta = {"game": name, "seed": game_seed, "player": "random-legal",
                    "reward": g.rewards[g.learner_seat], "choices": choices, "free": free}
            f.write(json.dumps({"messages": messages, "meta": meta}) + "\n")
    return path
