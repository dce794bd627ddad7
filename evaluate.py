"""Evaluation: how well a model plays, with 95% Wilson intervals, on seeds never used in training.

    python evaluate.py --model tiny --games matrix,tictactoe,spy          # one model, every fixed opponent
    python evaluate.py --model runs/A/checkpoint,runs/B/checkpoint --split test   # side by side
    python evaluate.py --plot runs/NAME                 # learning curves (PNG with matplotlib, else text)
    python evaluate.py --model tiny --benchmark questions.jsonl   # multiple-choice log-likelihood score
    python evaluate.py --baselines 1000                 # random and scripted play, N seeded games each

Matrix: a "win" is a correct answer under SPEC.md's equilibrium rule. TicTacToe: the learner's seat against
the random and the expert player. Spy: the learner's side among scripted (lexicon) players, also split by
the learner's role. Games are batched like the training rollouts. Results also go to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from games import eval_seed, game_names, make, play


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(policy, names, n: int, split: str = "train", opponent: str = "random", temperature: float = 0.0,
          max_new_tokens: int = 24, batch_size: int = 64, first: int = 0) -> dict[str, dict]:
    """Play n seeded games of each game with `policy` in the learner seat (scripted opponents; for
    TicTacToe the scripted `opponent`, or random when training used an LLM opponent): evaluation games
    first .. first + n - 1, whose seeds no training run uses (games.eval_seed)."""
    from grpo import is_llm_opponent, make_game, rollout
    opponent = "random" if is_llm_opponent(opponent) else opponent
    results = {}
    for name in names:
        episodes = [make_game(name, split, opponent).reset(eval_seed(first + i)) for i in range(n)]
        turns = 0
        # Similar prompt lengths share a batch, so little compute goes to padding.
        ordered = sorted(episodes, key=lambda g: len(g.prompt(g.to_move)))
        for start in range(0, n, batch_size):
            chunk = ordered[start:start + batch_size]
            batch = rollout(policy, chunk, temperature, max_new_tokens, seed=eval_seed(first + start))
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
    lines = ["| game | before: win [95% CI] | after: win [95% CI] | after: draw | after: invalid replies |",
             "|---|---|---|---|---|"]
    with_ci = lambda row: f"{row['win']:.1%} [{row['win_ci'][0]:.1%}, {row['win_ci'][1]:.1%}]"
    for name, row in after.items():
        old = with_ci(before[name]) if before else "-"
        lines.append(f"| {name} | {old} | {with_ci(row)} | {row['draw']:.1%} | {row['invalid']:.1%} |")
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
    for who in ("random", "scripted"):  # the learner's view: a random seat among scripted players
        outcomes = []
        for i in range(n):
            g = make("spy").reset(i)
            play(g, [who if s == g.learner_seat else "scripted" for s in range(4)])
            outcomes.append(g.outcome(g.learner_seat))
        rows.append(("spy", f"{who} seat among scripted", outcome_rates(outcomes)))
    return rows


# Fixed opponents per game: (label, TicTacToe opponent spec). Spy always uses its scripted players.
OPPONENTS = {"matrix": [("-", "random")], "tictactoe": [("random", "random"), ("expert", "expert")],
             "spy": [("scripted", "random")]}


def evaluate_model(policy, names, n, split, temperature) -> dict[str, dict]:
    """Every game against each of its fixed opponents: {"game/opponent": score row}."""
    out = {}
    for name in names:
        for label, spec in OPPONENTS[name]:
            out[f"{name}/{label}"] = score(policy, [name], n, split, spec, temperature)[name]
    return out


def results_table(results: dict[str, dict[str, dict]]) -> str:
    """Rows: models; columns: game/opponent; cells: win rate [95% CI] (and invalid-reply rate)."""
    columns = list(next(iter(results.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, row in results.items():
        cells = [f"{row[c]['win']:.0%} [{row[c]['win_ci'][0]:.0%}, {row[c]['win_ci'][1]:.0%}] inv {row[c]['invalid']:.0%}"
                 for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_lines(model: str, row: dict[str, dict]) -> list[str]:
    lines = [f"{model}:"]
    for column, r in row.items():
        ci = lambda k: f"{r[k]:6.1%} [{r[k + '_ci'][0]:.1%}, {r[k + '_ci'][1]:.1%}]"
        extra = "".join(f"  win as {k}: {r['win_as_' + k]:.1%}" for k in ("civilian", "spy") if f"win_as_{k}" in r)
        lines.append(f"  {column:<20} win {ci('win')}  draw {ci('draw')}  loss {ci('loss')}  "
                     f"invalid {ci('invalid')} of {r['turns']} turns{extra}")
    return lines


def benchmark_score(policy, path: Path) -> dict[str, float]:
    """Multiple choice from a JSONL file of {"question", "choices": [...], "answer": index or choice text}:
    the model picks the choice with the highest total log-likelihood as its reply to the question."""
    from policy import token_logprobs
    correct = total = 0
    for line in open(path):
        if not line.strip():
            continue
        item = json.loads(line)
        answer = item["answer"] if isinstance(item["answer"], int) else item["choices"].index(item["answer"])
        prompt = policy.user_turn_ids(item["question"], first=True)
        seqs = [prompt + policy.reply_ids(str(c)) for c in item["choices"]]  # each choice as a whole reply
        with torch.no_grad():
            logp = token_logprobs(policy, seqs)
        scores = [float(logp[i, len(prompt) - 1:len(s) - 1].sum()) for i, s in enumerate(seqs)]
        correct += max(range(len(scores)), key=scores.__getitem__) == answer
        total += 1
    return {"accuracy": correct / max(1, total), "n": total, "ci": wilson(correct, total)}


def plot_curves(run_dir: Path, keys=("reward", "kl", "entropy")) -> str:
    """Learning curves from metrics.jsonl: a PNG if matplotlib is installed, else a text table."""
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    keys = [k for k in keys if any(k in m for m in metrics)] + sorted(
        {k for m in metrics for k in m if k.endswith("/win")})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib for a PNG); the curves as text:")
        rows = [f"{'step':>5} " + " ".join(f"{k:>16}" for k in keys)]
        rows += [f"{m['step']:>5} " + " ".join(f"{m.get(k, float('nan')):>16.3f}" for k in keys) for m in metrics]
        return "\n".join(rows)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([m["step"] for m in metrics if key in m], [m[key] for m in metrics if key in m])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    return f"wrote {out}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="tiny", help="comma-separated: 'tiny' or local model folders (checkpoints)")
    parser.add_argument("--games", default="matrix,tictactoe,spy", help="comma-separated games")
    parser.add_argument("--n", type=int, default=100, help="seeded games per game and opponent")
    parser.add_argument("--split", default="train", choices=["train", "test", "both"], help="game split (test: held-out templates and words)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy")
    parser.add_argument("--out", default=None, help="JSON file for the results (default: next to the model, or ./eval.json)")
    parser.add_argument("--plot", default=None, metavar="RUN_DIR", help="draw learning curves of a run instead")
    parser.add_argument("--benchmark", default=None, metavar="JSONL", help="score a multiple-choice file instead")
    parser.add_argument("--baselines", type=int, default=0, metavar="N", help="print random/scripted baselines instead")
    args = parser.parse_args(argv)
    if args.plot:
        if not (Path(args.plot) / "metrics.jsonl").exists():
            parser.error(f"no metrics.jsonl in {args.plot}")
        print(plot_curves(Path(args.plot)))
        return
    if args.baselines:
        print(f"{'game':<11}{'setting (win = learner / civilian side)':<40}{'win':>7}{'draw':>7}{'loss':>7}")
        for game, setting, rates in baseline_rows(args.baselines):
            print(f"{game:<11}{setting:<40}" + "".join(f"{rates[k]:>7.1%}" for k in ("win", "draw", "loss")))
        return
    try:
        names = game_names(args.games)
    except ValueError as error:
        parser.error(str(error))
    if args.n < 1:
        parser.error("--n must be at least 1")
    from policy import load_policy
    results = {}
    for model in args.model.split(","):
        policy = load_policy(model)
        if args.benchmark:
            results[model] = benchmark_score(policy, Path(args.benchmark))
            print(f"{model}: accuracy {results[model]['accuracy']:.1%} on {results[model]['n']} questions")
            continue
        for split in (["train", "test"] if args.split == "both" else [args.split]):
            row = evaluate_model(policy, names, args.n, split, args.temperature)
            results[f"{model} ({split})"] = row
            print("\n".join(detail_lines(f"{model} ({split})", row)), file=sys.stderr)
    if not args.benchmark:
        print(results_table(results))
    out = Path(args.out or "eval.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
