"""The three games: Matrix games, TicTacToe and Who's the Spy, behind one turn-based text protocol.

    game = make(name, split="train"|"test", **options).reset(seed)  # same seed: the same game
    game.num_seats, game.to_move (None once over), game.learner_seat
    game.prompt(seat) -> str        # what that seat sees now (after an invalid reply: why, and how)
    game.step(seat, reply) -> bool  # False for an invalid reply; the position is then unchanged
    game.done, game.rewards         # one float per seat, final once done

A reply carries its move inside <answer>...</answer>. An invalid reply costs its seat
INVALID_PENALTY and the seat tries again; after `max_tries` invalid replies in a row for one move it
forfeits (a loss). A seat plays as one conversation, so a prompt says only what changed since the
seat's last turn (a retry prompt: the reason and the instruction), and every prompt that asks for a
choice ends with the list of them. `game.scripted_reply(seat)` is the game's scripted player
(Matrix: the correct answer; TicTacToe: random, expert or eps:P; Spy: a lexicon player),
`game.random_reply(seat)` a random legal one. `python games.py` prints one game of each.
"""
from __future__ import annotations

import functools
import itertools
import random
import re
import sys

import numpy as np

INVALID_PENALTY = -0.1
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


# One seed scheme: training instances have even seeds and evaluation games odd ones, so that
# training never plays an evaluation game, whatever the run's seed.
def train_seed(run_seed: int, step: int, index: int) -> int:
    """The seed of instance `index` of a training step (distinct for steps below 1,000,003)."""
    if run_seed < 0 or not 0 <= index < 100_003:
        raise ValueError("seeds and instance indices are non-negative, an index below 100,003")
    return 2 * ((run_seed * 1_000_003 + step) * 100_003 + index)


def eval_seed(i: int) -> int:
    return 2 * i + 1


def parse_answer(text) -> str | None:
    """The inside of the last complete <answer>...</answer> in `text`, stripped, or None."""
    if not isinstance(text, str):
        return None
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    return None if start < 0 else text[start + len(ANSWER_OPEN):end].strip()


def answer(move: str) -> str:
    return f"{ANSWER_OPEN}{move}{ANSWER_CLOSE}"


class Game:
    """Shared bookkeeping: turn order, invalid replies, penalties, forfeits, rewards."""
    name = "game"
    num_seats = 1
    held_out = True  # a "test" split of variants that training never sees

    def __init__(self, split: str = "train", max_tries: int = 3):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if max_tries < 1:
            raise ValueError("max_tries must be at least 1")
        self.split, self.max_tries = split, max_tries

    def reset(self, seed: int) -> "Game":
        self.seed = seed
        self.rng = random.Random(seed)                    # the game itself: roles, words, ties
        self.opponent_rng = random.Random(f"{seed}:players")  # scripted and random players' choices
        n = self.num_seats
        self.learner_seat = 0
        self.invalid = [0] * n       # invalid replies so far, per seat
        self.tries = [0] * n         # invalid replies in a row for the current move
        self.error = [None] * n      # why the last reply was invalid, shown in the next prompt
        self.forfeited = [False] * n
        self.base = [0.0] * n        # game reward before penalties
        self.to_move = 0
        return self

    @property
    def done(self) -> bool:
        return self.to_move is None

    @property
    def rewards(self) -> list[float]:
        return [(0.0 if forfeited else base) + INVALID_PENALTY * invalid
                for base, forfeited, invalid in zip(self.base, self.forfeited, self.invalid)]

    def outcome(self, seat: int) -> str:
        """'win', 'draw' or 'loss' for a finished game (Matrix: a correct answer is a win)."""
        base = 0.0 if self.forfeited[seat] else self.base[seat]
        return "win" if base == 1.0 else "draw" if base == 0.5 else "loss"

    def step(self, seat: int, reply: str) -> bool:
        if self.done or seat != self.to_move:
            return False  # not this seat's turn: a caller error, nothing changes
        move = parse_answer(reply)
        if move is None:
            error = f"no {ANSWER_OPEN}...{ANSWER_CLOSE} found"
        else:
            error = self._apply(seat, move)
        if error is None:
            self.tries[seat], self.error[seat] = 0, None
            return True
        self.invalid[seat] += 1
        self.tries[seat] += 1
        self.error[seat] = error[:200]
        if self.tries[seat] >= self.max_tries:
            self.forfeited[seat] = True
            self._forfeit(seat)
        return False

    def prompt(self, seat: int) -> str:
        if self.error[seat]:
            return (f"Your last reply was invalid: {self.error[seat]}. "
                    f"Try {self.tries[seat] + 1} of {self.max_tries}.\n") + self._instruction(seat)
        return self._prompt(seat)

    # Each game implements these.
    def _apply(self, seat: int, move: str) -> str | None: ...
    def _forfeit(self, seat: int) -> None: ...
    def _prompt(self, seat: int) -> str: ...       # the whole state, ending with the instruction
    def _instruction(self, seat: int) -> str: ...  # how to answer (again after an invalid reply)
    def scripted_reply(self, seat: int) -> str: ...
    def legal_replies(self, seat: int) -> list[str] | None: ...  # valid replies (None: free text)

    def random_replies(self, seat: int) -> list[str]:
        """What random play draws from, uniformly: the legal replies, or a game's pool where they
        are free text."""
        return self.legal_replies(seat)

    def random_reply(self, seat: int) -> str:
        return self.opponent_rng.choice(self.random_replies(seat))


# -------------------------------------------------------------------------------------- Matrix
MATRIX_GAMES = {  # name: (A = Player 1's payoffs, B = Player 2's); rows are Player 1's actions
    "prisoners_dilemma": ([[3, 0], [5, 1]], [[3, 5], [0, 1]]),
    "battle_of_sexes": ([[2, 0], [0, 1]], [[1, 0], [0, 2]]),
    "chicken": ([[-10, 1], [-1, 0]], [[-10, -1], [1, 0]]),
    "stag_hunt": ([[3, 0], [1, 1]], [[3, 1], [0, 1]]),
    "radio_station": ([[25, 50, 50], [30, 15, 30], [20, 20, 10]],
                      [[25, 30, 20], [50, 15, 20], [50, 30, 10]]),
    "iesds": ([[13, 1, 7], [4, 3, 6], [-1, 2, 8]], [[3, 4, 3], [1, 3, 2], [2, 3, -1]]),
    "duopoly": ([[0, 0, 0, 0, 0, 0], [9, 7, 5, 3, 1, -1], [14, 10, 6, 2, -2, -2],
                 [15, 9, 3, -3, -3, -3], [12, 4, -4, -4, -4, -4], [5, -5, -5, -5, -5, -5]],
                [[0, 9, 14, 15, 12, 5], [0, 7, 10, 9, 4, -5], [0, 5, 6, 3, -4, -5],
                 [0, 3, 2, -3, -4, -5], [0, 1, -2, -3, -4, -5], [0, -1, -2, -3, -4, -5]]),
    "game_3x4": ([[1, -1, 5, 1], [2, 1, 3, 5], [1, 0, 1, 0]],
                 [[1, 2, 0, 1], [3, 2, 0, 1], [1, 5, 7, 1]]),
    "weakly_dominated": ([[5, 4], [6, 3], [6, 4]], [[1, 0], [0, 1], [4, 1]]),
}
NEGATABLE = list(MATRIX_GAMES)[:7]


def pure_equilibria(A: np.ndarray, B: np.ndarray) -> list[tuple[int, int]]:
    """Cells where each player's action is a best response to the other's."""
    return [(i, j) for i in range(A.shape[0]) for j in range(A.shape[1])
            if A[i, j] >= A[:, j].max() and B[i, j] >= B[i, :].max()]


def mixed_equilibria(A: np.ndarray, B: np.ndarray, tol: float = 1e-9) -> list[tuple]:
    """Support enumeration (equal sizes): each mix makes the other indifferent on its support."""
    def indifferent_mix(M: np.ndarray) -> np.ndarray | None:  # q with M q = v * 1, sum q = 1
        k = M.shape[1]
        lhs = np.block([[M, -np.ones((M.shape[0], 1))], [np.ones((1, k)), np.zeros((1, 1))]])
        try:
            sol = np.linalg.solve(lhs, np.r_[np.zeros(M.shape[0]), 1.0])
        except np.linalg.LinAlgError:
            return None
        return sol[:k] if (sol[:k] >= -tol).all() else None

    found = []
    m, n = A.shape
    for k in range(1, min(m, n) + 1):
        supports = itertools.product(itertools.combinations(range(m), k),
                                     itertools.combinations(range(n), k))
        for rows, cols in supports:
            y_s = indifferent_mix(A[np.ix_(rows, cols)])
            x_s = indifferent_mix(B[np.ix_(rows, cols)].T)
            if x_s is None or y_s is None:
                continue
            x, y = np.zeros(m), np.zeros(n)
            x[list(rows)], y[list(cols)] = x_s, y_s
            # no profitable deviation
            if (A @ y).max() <= x @ A @ y + tol and (x @ B).max() <= x @ B @ y + tol:
                found.append((x, y))
    return found


def correct_actions(A, B, player: int) -> list[int]:
    """0-based actions of `player` (1 or 2) that are correct: a selected Nash equilibrium's.

    Pure equilibria exist: keep those with the highest joint payoff; every action the player takes
    in one of them is correct. Otherwise: the most probable action(s) of the player's mixed
    equilibrium strategy."""
    A, B = np.asarray(A, float), np.asarray(B, float)
    pure = pure_equilibria(A, B)
    if pure:
        best = max(A[e] + B[e] for e in pure)
        return sorted({e[player - 1] for e in pure if A[e] + B[e] == best})
    strategy = mixed_equilibria(A, B)[0][player - 1]
    return [int(a) for a in np.flatnonzero(strategy >= strategy.max() - 1e-9)]


def _each(A, B, cell: str, sep: str = "\n", by_column: bool = False) -> str:
    """Every cell in the format `cell` over i, j (1-based actions), a (P1's payoff), b (P2's)."""
    cells = [(i, j) for i in range(len(A)) for j in range(len(A[0]))]
    cells.sort(key=(lambda c: c[::-1]) if by_column else None)
    return sep.join(cell.format(i=i + 1, j=j + 1, a=A[i][j], b=B[i][j]) for i, j in cells)


MATRIX_TEMPLATES = {  # name -> render(A, B); the "test" ones are only seen on the held-out split
    "train": {
        "table": lambda A, B: "Payoffs (row player, column player):\n       " + "".join(
            f"col {j + 1:<5}" for j in range(len(A[0]))).rstrip() + "".join(
            f"\nrow {i + 1}: " + "".join(f"{f'{a},{b}':<9}" for a, b in zip(A[i], B[i])).rstrip()
            for i in range(len(A))),
        "cells": lambda A, B: "Payoffs (Player 1, Player 2) per cell:\n"
        + _each(A, B, "Row {i}, column {j}: {a}, {b}"),
        "story": lambda A, B: "Two rivals each pick a plan in secret; what the first and the "
        "second earn:\n" + _each(A, B, "plans {i} and {j}: {a} and {b}"),
        "arrays": lambda A, B: f"A = {A}\nB = {B}\nA: Player 1's payoffs, B: Player 2's; rows are "
        "Player 1's actions.",
        "csv": lambda A, B: "p1_action,p2_action,p1_payoff,p2_payoff\n"
        + _each(A, B, "{i},{j},{a},{b}"),
        "json": lambda A, B: "{" + _each(A, B, '"{i},{j}": [{a}, {b}]', ", ")
        + "}\nKeys: 'P1 action,P2 action'; values: [P1 payoff, P2 payoff].",
        "pairs": lambda A, B: _each(A, B, "({i},{j}) -> ({a},{b})")
        + "\n(P1 action,P2 action) -> (P1 payoff,P2 payoff)",
    },
    "test": {
        "by_column": lambda A, B: "Outcomes listed by Player 2's action:\n" + _each(
            A, B, "P2 plays {j}, P1 plays {i}: P2 gets {b}, P1 gets {a}.", by_column=True),
        "sentences": lambda A, B: _each(A, B, "If Player 1 plays {i} and Player 2 plays {j}, they "
                                        "receive {a} and {b} respectively.", " "),
    },
}


class MatrixGame(Game):
    """One-shot bimatrix game: the one seat is Player 1 or 2 and names an action (1-based)."""
    name, num_seats = "matrix", 1

    def reset(self, seed):
        super().reset(seed)
        rng = self.rng
        self.game_name = rng.choice(list(MATRIX_GAMES))
        A, B = (np.array(m) for m in MATRIX_GAMES[self.game_name])
        self.negated = self.game_name in NEGATABLE and rng.random() < 0.5
        if self.negated:
            A, B = -A, -B
        self.offset = rng.choice([0, 100, -100])
        self.A, self.B = (A + self.offset).tolist(), (B + self.offset).tolist()
        self.role = rng.choice([1, 2])
        self.template = rng.choice(list(MATRIX_TEMPLATES[self.split]))
        self.correct = correct_actions(self.A, self.B, self.role)
        self.num_actions = len(self.A) if self.role == 1 else len(self.A[0])
        return self

    def _prompt(self, seat):
        payoffs = MATRIX_TEMPLATES[self.split][self.template](self.A, self.B)
        return f"A one-shot game between two players.\n{payoffs}\n" + self._instruction(seat)

    def _instruction(self, seat):
        actions = " | ".join(self._action(a) for a in range(self.num_actions))
        return (f"You are Player {self.role}. Choose your action and reply with "
                f"{answer('action k')}, one of:\n{actions}")

    @staticmethod
    def _action(a: int) -> str:
        return f"action {a + 1}"

    def _apply(self, seat, move):
        found = re.fullmatch(r"(?:action\s*)?(\d{1,3})\.?", move, re.IGNORECASE)
        if not found or not 1 <= int(found.group(1)) <= self.num_actions:
            return f"the answer must be an action number from 1 to {self.num_actions}"
        self.base[0] = 1.0 if int(found.group(1)) - 1 in self.correct else 0.0
        self.to_move = None

    def _forfeit(self, seat):
        self.to_move = None

    def scripted_reply(self, seat):
        return answer(self._action(self.opponent_rng.choice(self.correct)))

    def legal_replies(self, seat):
        return [answer(self._action(a)) for a in range(self.num_actions)]


# ----------------------------------------------------------------------------------- TicTacToe
LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


def winner(board: str) -> str | None:
    """'X' or 'O' for three in a line, else None. A board is 9 characters of 'X', 'O' and '.'."""
    for a, b, c in LINES:
        if board[a] != "." and board[a] == board[b] == board[c]:
            return board[a]
    return None


@functools.lru_cache(maxsize=None)
def minimax(board: str, mark: str) -> int:
    """Value of `board` for `mark`, to move: >0 a forced win (sooner: more), 0 a draw, <0 a loss."""
    other = "O" if mark == "X" else "X"
    if winner(board) == other:
        return -(1 + board.count("."))
    if "." not in board:
        return 0
    free = [i for i in range(9) if board[i] == "."]
    return max(-minimax(board[:i] + mark + board[i + 1:], other) for i in free)


def expert_moves(board: str, mark: str) -> list[int]:
    """All cells (0-8) that keep the minimax value of the position for `mark`."""
    other = "O" if mark == "X" else "X"
    free = [i for i in range(9) if board[i] == "."]
    values = {i: -minimax(board[:i] + mark + board[i + 1:], other) for i in free}
    best = max(values.values())
    return [i for i, v in values.items() if v == best]


def opponent_randomness(spec: str) -> tuple[float, float]:
    """TicTacToe opponent spec -> the range its probability of a random move is drawn from, once a
    game: random (1, 1), expert (0, 0), eps:P (P, P), eps:P-Q (P, Q)."""
    if spec in ("random", "expert"):
        return (1.0, 1.0) if spec == "random" else (0.0, 0.0)
    found = re.fullmatch(r"eps:([0-9]*\.?[0-9]+)(?:-([0-9]*\.?[0-9]+))?", spec)
    low, high = (1, 0)  # no range: an error
    if found:
        low, high = float(found.group(1)), float(found.group(2) or found.group(1))
    if not 0 <= low <= high <= 1:
        raise ValueError("tictactoe opponent must be random, expert, eps:P or eps:P-Q with "
                         f"0<=P<=Q<=1, got {spec!r}")
    return low, high


class TicTacToe(Game):
    """3x3 TicTacToe. Marks (X/O), who moves first and the learner's seat are drawn at reset."""
    name, num_seats, held_out = "tictactoe", 2, False  # one board, no variants

    def __init__(self, split="train", max_tries=3, opponent: str = "random"):
        super().__init__(split, max_tries)
        self.random_range = opponent_randomness(opponent)

    def reset(self, seed):
        super().reset(seed)
        self.board = "." * 9
        self.has_moved = [False, False]
        self.learner_seat = self.rng.randrange(2)
        self.marks = ("X", "O") if self.rng.random() < 0.5 else ("O", "X")
        self.to_move = self.rng.randrange(2)
        self.roles = ["first" if s == self.to_move else "second" for s in range(2)]
        low, high = self.random_range
        self.random_prob = low if low == high else self.rng.uniform(low, high)
        return self

    def legal_moves(self) -> list[int]:
        return [i for i, c in enumerate(self.board) if c == "."]

    def _place(self, seat, cell):
        self.board = self.board[:cell] + self.marks[seat] + self.board[cell + 1:]
        if winner(self.board):
            self.base[seat], self.to_move = 1.0, None
        elif "." not in self.board:
            self.base, self.to_move = [0.5, 0.5], None
        else:
            self.to_move = 1 - seat

    def render(self) -> str:
        rows = [f"{r + 1} " + " ".join(self.board[3 * r:3 * r + 3]) for r in range(3)]
        return "  1 2 3\n" + "\n".join(rows)

    def _prompt(self, seat):
        if self.has_moved[seat]:  # the conversation holds the rules: the board and free cells only
            return f"{self.render()}\n" + self._instruction(seat)
        rules = f"TicTacToe. You play {self.marks[seat]}; three in a row wins."
        return f"{rules}\n{self.render()}\n" + self._instruction(seat)

    def _instruction(self, seat):
        free = " ".join(self._cell(i) for i in self.legal_moves())
        return f"Reply with your move as {answer('(row,col)')}, one of the free cells:\n{free}"

    @staticmethod
    def _cell(i: int) -> str:
        return f"({i // 3 + 1},{i % 3 + 1})"

    def _apply(self, seat, move):
        found = re.fullmatch(r"\(?\s*(\d)\s*,\s*(\d)\s*\)?", move)
        if not found or not all(1 <= int(g) <= 3 for g in found.groups()):
            return "a move is (row,col) with row and column from 1 to 3"
        row, col = found.groups()
        cell = (int(row) - 1) * 3 + int(col) - 1
        if self.board[cell] != ".":
            return f"cell ({row},{col}) is taken"
        self.has_moved[seat] = True
        self._place(seat, cell)

    def _forfeit(self, seat):
        self.base[1 - seat], self.to_move = 1.0, None

    def _reply(self, cell):
        return answer(self._cell(cell))

    def scripted_reply(self, seat):
        if self.opponent_rng.random() < self.random_prob:
            return self.random_reply(seat)
        return self._reply(self.opponent_rng.choice(expert_moves(self.board, self.marks[seat])))

    def legal_replies(self, seat):
        return [self._reply(cell) for cell in self.legal_moves()]


# ------------------------------------------------------------------------------- Who's the Spy
# A pair a line (an indented line goes on): "word / word: attributes of both | attributes of the
# first only | of the second only".
LEXICON_TEXT = """\
coffee / tea: hot drink, cup, caffeine | beans, espresso, roasted | leaves, kettle, herbal
cat / dog: pet, fur, tail | meow, purr, litter box | bark, fetch, leash
apple / pear: fruit, orchard, juicy | red, pie, cider | bell shape, grainy, green skin
piano / guitar: instrument, music, notes | keys, pedals, grand | strings, strum, frets
sun / moon: sky, round, light | daytime, hot, solar | night, craters, tides
river / lake: water, fish, boat | flowing, current, delta | still, shore, frozen
train / bus: passengers, ticket, timetable | rails, station, carriages |
    road, city stops, double decker
pen / pencil: writing, paper, school | ink, cap, ballpoint | graphite, eraser, sharpener
beach / desert: sand, hot, sunburn | waves, swimming, seashells | cactus, dunes, camel
doctor / nurse: hospital, patients, medicine | diagnosis, surgeon, prescription |
    care, shifts, injections
rose / tulip: flower, garden, petals | thorns, romance, valentine | bulb, holland, spring
soccer / basketball: ball, team, sport | goal, kick, pitch | hoop, dribble, court
winter / summer: season, weather, holiday | snow, cold, scarf | heat, vacation, sunscreen
pizza / burger: fast food, cheese, dinner | slice, oven, italian | bun, patty, grill
chair / sofa: furniture, sit, living room | legs, desk, wooden | cushions, nap, three seats
umbrella / raincoat: rain, wet, stay dry | open, handle, folding | hood, wear, pockets
lion / tiger: big cat, predator, roar | mane, pride, savanna | stripes, jungle, orange
ship / airplane: travel, captain, crew | sea, anchor, port | wings, runway, pilot
book / movie: story, characters, plot | pages, chapters, library | screen, cinema, popcorn
bread / cake: baked, flour, oven | sandwich, toast, loaf | birthday, candles, frosting
milk / juice: drink, glass, breakfast | cow, white, dairy | orange, squeezed, fruit
shoes / socks: feet, pair, wear | laces, heels, sole | cotton, warm, drawer
mountain / hill: high, climb, slope | peak, snowy, altitude | gentle, grassy, small
car / bicycle: ride, wheels, road | engine, fuel, steering | pedals, helmet, chain
phone / computer: screen, internet, electronic | call, pocket, ringtone | keyboard, mouse, desk
bee / butterfly: insect, wings, flowers | honey, sting, hive | colorful, caterpillar, cocoon
ice cream / yogurt: cold, dessert, creamy | cone, scoop, sprinkles | breakfast, healthy, probiotic
teacher / student: school, classroom, lessons | grades, lecture, chalk | homework, exams, backpack
wolf / fox: wild, forest, hunt | pack, howl, full moon | red, clever, bushy tail
knife / fork: cutlery, kitchen, metal | sharp, cut, blade | prongs, spaghetti, tines
candle / lamp: light, room, night | wax, flame, wick | bulb, switch, electric
clock / watch: time, hands, tick | wall, alarm, tower | wrist, strap, wear
salt / sugar: white, crystals, kitchen | sea, savory, pepper | sweet, candy, dessert
honey / jam: sweet, jar, toast | bees, golden, sticky | strawberry, fruit, preserve
castle / palace: king, royal, large | walls, moat, towers | gold, ballroom, luxury
police / firefighter: emergency, uniform, siren | handcuffs, arrest, badge | hose, flames, ladder
violin / cello: strings, bow, orchestra | chin, small, fiddle | large, deep sound, sit
banana / mango: fruit, tropical, yellow | peel, monkey, bunch | seed, juicy, smoothie
shark / dolphin: ocean, fins, swim | teeth, jaws, dangerous | smart, friendly, clicks
jacket / sweater: wear, warm, cold days | zipper, pockets, waterproof | wool, knitted, pullover
bed / hammock: sleep, rest, lie down | mattress, pillow, headboard | swing, rope, garden
chess / checkers: board game, pieces, strategy | king, queen, checkmate | jump, red and black, crown
rice / pasta: grain, boil, dinner | asian, chopsticks, sushi | italian, noodles, sauce
owl / eagle: bird, feathers, claws | night, hoot, wise | soar, bald, mountains
snake / lizard: reptile, scales, cold blooded | venom, slither, no legs | legs, tail, sunbathing
forest / jungle: trees, wild, green | pine, deer, hiking | tropical, vines, humid
nail / screw: metal, wood, hardware | hammer, pound, flat head | twist, thread, drill
mirror / window: glass, frame, wall | reflect, bathroom, vanity | view, curtains, open
cloud / fog: mist, white, grey | rain, fluffy, float | ground, thick, cannot see
pirate / sailor: ship, sea, crew | treasure, parrot, eye patch | navy, uniform, knots
ghost / vampire: scary, night, halloween | white sheet, haunt, boo | blood, fangs, bat
ketchup / mustard: sauce, bottle, hot dog | tomato, red, fries | yellow, spicy, seeds
glasses / contact lenses: vision, eyes, optician | frames, nose, case | invisible, finger, solution
cookie / cracker: snack, crunchy, baked | chocolate chips, sweet, milk | salty, cheese, savory
hospital / pharmacy: medicine, health, sick | beds, surgery, ambulance |
    pills, prescription, counter
drum / trumpet: instrument, band, loud | sticks, beat, rhythm | brass, blow, valves
president / mayor: leader, election, politics | country, white house, nation |
    city, town hall, local
library / bookstore: books, shelves, reading | borrow, quiet, librarian | buy, cashier, new releases
elephant / rhino: big, grey, africa | trunk, tusks, ears | horn, thick skin, charge
hat / helmet: head, wear, protect | brim, fashion, sun | hard, safety, motorcycle
soup / stew: hot, bowl, spoon | broth, liquid, starter | thick, meat, slow cooked
email / letter: message, send, write | inbox, online, attachment | envelope, stamp, mailbox
television / radio: broadcast, news, channels | screen, watch, remote | listen, car, frequency
map / compass: navigation, travel, direction | paper, roads, fold | needle, north, magnetic
key / lock: door, metal, security | turn, pocket, ring | padlock, combination, latch
"""


def _parse_lexicon(text: str) -> list[dict]:
    pairs = []
    for line in text.strip().replace("\n    ", " ").splitlines():
        words, attrs = line.split(":")
        shared, first, second = ([a.strip() for a in part.split(",")] for part in attrs.split("|"))
        w1, w2 = (w.strip() for w in words.split("/"))
        pairs.append({"words": (w1, w2), "shared": shared, w1: first, w2: second})
    return pairs


WORD_PAIRS = _parse_lexicon(LEXICON_TEXT)
# Every fifth pair is held out.
SPY_PAIRS = {"train": [p for i, p in enumerate(WORD_PAIRS) if i % 5 != 4],
             "test": WORD_PAIRS[4::5]}
PAIR_OF = {w: p for p in WORD_PAIRS for w in p["words"]}


def pair_attributes(pair: dict) -> list[str]:
    """Every attribute in a word pair's lexicon line: shared, the first word's, the second's."""
    return pair["shared"] + [a for w in pair["words"] for a in pair[w]]


MAX_DESCRIPTION_WORDS = 12


@functools.lru_cache(maxsize=4096)
def _words_of(text: str) -> str:
    """Lowercase words, single spaces, padded: ' phrase ' finds whole words and phrases."""
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def mentions(text: str, phrase: str) -> bool:
    return _words_of(phrase) in _words_of(text)


def says_word(text: str, word: str) -> bool:
    """Does `text` contain the secret `word` (or its plural)?"""
    return any(mentions(text, word + end) for end in ("", "s", "es"))




class Spy(Game):
    """Who's the Spy: 3 civilians share a word, the spy has its partner. Two rounds, one vote."""
    name, num_seats = "spy", 4
    ROUNDS = 2
    # The speaking order.
    TURNS = [(phase, s) for phase in range(ROUNDS + 1) for s in range(4)]

    def reset(self, seed):
        super().reset(seed)
        rng = self.rng
        pair = rng.choice(SPY_PAIRS[self.split])
        civilian_word, spy_word = rng.sample(pair["words"], 2)
        self.spy = rng.randrange(4)
        self.words = [spy_word if s == self.spy else civilian_word for s in range(4)]
        self.roles = ["spy" if s == self.spy else "civilian" for s in range(4)]
        self.learner_seat = rng.randrange(4)
        self.descriptions = [[None] * 4 for _ in range(self.ROUNDS)]
        self.votes = [None] * 4
        self.eliminated = None
        self.phase = 0  # description rounds 0..ROUNDS-1, then the vote (phase == ROUNDS)
        return self

    def _advance(self, seat):
        """Next seat in order that has not forfeited; after the last vote, count the votes."""
        position = self.TURNS.index((self.phase, seat))
        for phase, s in self.TURNS[position + 1:]:
            if not self.forfeited[s]:
                self.phase, self.to_move = phase, s
                return
        self._count_votes()

    def _count_votes(self):
        tally = [self.votes.count(s) for s in range(4)]
        top = [s for s in range(4) if tally[s] == max(tally)]
        self.eliminated = self.rng.choice(top)
        civilians_win = self.eliminated == self.spy
        self.base = [1.0 if (r == "civilian") == civilians_win else 0.0 for r in self.roles]
        self.to_move = None

    def _apply(self, seat, move):
        if self.phase < self.ROUNDS:
            if not move:
                return "the description is empty"
            if len(move) > 120 or len(move.split()) > MAX_DESCRIPTION_WORDS:
                return f"a description has at most {MAX_DESCRIPTION_WORDS} words"
            if says_word(move, self.words[seat]):
                return "the description contains your secret word"
            self.descriptions[self.phase][seat] = move
        else:
            found = re.fullmatch(r"(?:player\s*)?(\d{1,2})\.?", move, re.IGNORECASE)
            target = int(found.group(1)) - 1 if found else -1
            if not 0 <= target < 4:
                return "a vote is 'Player k' with k from 1 to 4"
            if target == seat:
                return "you cannot vote for yourself"
            self.votes[seat] = target
        self._advance(seat)

    def _forfeit(self, seat):
        self._advance(seat)

    def _said_since_last_turn(self, seat: int) -> list[str]:
        """The descriptions given since this seat's previous turn (or the start), in order."""
        now = self.TURNS.index((self.phase, seat))
        before = self.TURNS.index((self.phase - 1, seat)) + 1 if self.phase > 0 else 0
        return [f"{self._player(s)}: {self.descriptions[r][s]}" for r, s in self.TURNS[before:now]
                if r < self.ROUNDS and self.descriptions[r][s] is not None]

    def _prompt(self, seat):
        """The rules and the seat's word in its first prompt only: the conversation holds them."""
        head = ""
        if self.phase == 0:
            head = ("Who's the Spy. Four players: three share a word, the spy has a different one. "
                    f"You are Player {seat + 1}, and your word is {self.words[seat]} .\n")
        said = self._said_since_last_turn(seat)
        return head + "".join(line + "\n" for line in said) + self._instruction(seat)

    def _instruction(self, seat):
        if self.phase < self.ROUNDS:
            reply = answer("description")
            return f"Describe your word in a few words without saying it. Reply {reply}."
        others = " | ".join(self._player(s) for s in self._vote_order(seat))
        return f"Vote for the spy (not yourself). Reply {answer('Player k')}, one of:\n{others}"

    def _evidence(self, seat: int, about: list[int]) -> dict[int, int]:
        """Per seat in `about`: mentions of attributes of this seat's word only, less its pair's."""
        pair = PAIR_OF[self.words[seat]]
        own = pair[self.words[seat]]
        other = pair[[w for w in pair["words"] if w != self.words[seat]][0]]
        score = {}
        for s in about:
            said = [r[s] for r in self.descriptions if r[s]]
            ours = sum(mentions(d, a) for d in said for a in own)
            score[s] = ours - sum(mentions(d, a) for d in said for a in other)
        return score

    def scripted_reply(self, seat):
        """Describe with own distinctive attributes until the others' words point to the partner
        word, then, as a likely spy, blend in with shared ones; vote for the least consistent."""
        others = [s for s in range(4) if s != seat and not self.forfeited[s]]
        evidence = self._evidence(seat, others)
        think_spy = sum(evidence.values()) < 0
        if self.phase < self.ROUNDS:
            pair = PAIR_OF[self.words[seat]]
            pool = pair["shared"] if think_spy else pair[self.words[seat]]
            used = {a for r in self.descriptions if r[seat] for a in pool if mentions(r[seat], a)}
            attribute = self.opponent_rng.choice([a for a in pool if a not in used] or pool)
            return answer(attribute)  # the attribute itself: the judge looks for nothing else
        # A likely spy believes the majority has the partner word: the least consistent with it is a
        # civilian who looks odd to the others; either way, vote for the lowest score under the
        # believed majority word.
        key = lambda s: -evidence[s] if think_spy else evidence[s]
        lowest = min(key(s) for s in others)
        suspects = [s for s in others if key(s) == lowest]
        return answer(self._player(self.opponent_rng.choice(suspects)))

    def legal_replies(self, seat):
        if self.phase < self.ROUNDS:
            return None
        return [answer(self._player(s)) for s in self._vote_order(seat)]

    @staticmethod
    def _player(seat: int) -> str:
        return f"Player {seat + 1}"

    @staticmethod
    def _vote_order(seat: int) -> list[int]:
        """The seats one may vote for, in turn order after `seat`: the list ends with the seat just
        before the voter's, so the missing number can be read from the end of the prompt."""
        return [(seat + d) % 4 for d in (1, 2, 3)]

    def random_replies(self, seat):
        """A vote, or a description that is one attribute of the seat's word pair
        (pair_attributes): what random play, and so the tiny model's warm start, says."""
        if self.phase < self.ROUNDS:
            return [answer(a) for a in pair_attributes(PAIR_OF[self.words[seat]])]
        return self.legal_replies(seat)


GAMES = {"matrix": MatrixGame, "tictactoe": TicTacToe, "spy": Spy}
# Every choice a game lists at the end of a prompt (a cell, a vote, an action), written the same in
# the list and in the reply: the tiny tokenizer makes each one token (policy.build_tiny_tokenizer).
CHOICES = ([TicTacToe._cell(i) for i in range(9)] + [Spy._player(s) for s in range(4)]
           + [MatrixGame._action(a) for a in range(6)])


def game_names(text: str) -> list[str]:
    """'matrix, spy' -> ['matrix', 'spy'] (--games); ValueError on an unknown name."""
    names = [g.strip() for g in text.split(",") if g.strip()]
    for name in names or [text]:
        if name not in GAMES:
            raise ValueError(f"unknown game {name!r}; valid games: {', '.join(GAMES)}")
    return names


def make(name: str, split: str = "train", **options) -> Game:
    game_names(name)
    try:
        return GAMES[name](split=split, **options)
    except TypeError as error:  # an option the game does not take
        raise ValueError(f"bad options for {name}: {error}") from None


# ---------------------------------------------------------------------------- demo, baselines
def play_scripted(game: Game, players) -> Game:
    """Play to the end; players[seat] is 'scripted' or 'random'."""
    for _ in range(1000):
        if game.done:
            return game
        seat = game.to_move
        play = game.scripted_reply if players[seat] == "scripted" else game.random_reply
        game.step(seat, play(seat))
    raise RuntimeError("game did not end")


def main():
    """`python games.py [SEED]`: one game of each, scripted players, the learner's prompts shown."""
    seed = int(sys.argv[1]) if sys.argv[1:] else 0
    for name in GAMES:
        game = make(name).reset(seed)
        print(f"{'=' * 30} {name} (seed {seed}, learner is seat {game.learner_seat}) {'=' * 30}")
        while not game.done:
            seat, reply = game.to_move, game.scripted_reply(game.to_move)
            if seat == game.learner_seat:
                print(f"--- prompt to seat {seat}:\n{game.prompt(seat)}")
            print(f"--- seat {seat} replies: {reply}")
            game.step(seat, reply)
        print(f"--- rewards: {game.rewards}\n")


if __name__ == "__main__":
    main()
