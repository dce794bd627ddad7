"""GRPO on text games, from scratch: `python grpo.py --games matrix,tictactoe,spy`.

Per step: draw B game instances (seeds) and play each G times (a group: same seed, same seat, same words).
All B*G episodes advance together; each turn is one batched generation call per model over every episode
waiting on it, and scripted seats act in place. The learner's whole conversation is one token sequence;
its return R is the game reward plus the invalid-reply penalties (-0.1 each). Then, per token t of
episode i (only tokens the learner sampled; game-master and opponent text is masked out):

    A_i   = (R_i - mean(R_group)) / (std(R_group) + 1e-4)           (--scale-rewards none: no division)
    r_t   = exp(logp_t - logp_old_t)                                 (logp_old: recorded while sampling)
    k3_t  = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1     (KL to the frozen start model)
    loss  = mean_t[ -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta k3_t ]

Groups whose rewards are all equal carry no signal and are dropped (optionally only the top fraction of
groups by spread is kept). The batch is split into minibatches, one AdamW step each (grad norm clipped at
1), so the ratio and the clip act from the second minibatch on; mean_t is over the learner tokens of the
whole step (a minibatch divides its sum by the step's tokens per minibatch), so every token weighs the same.
std is the population standard deviation.

Simplifications: one process (no DDP yet); the reference model is the model training started from; an
episode's text is what the learner saw, in the games' own prompts.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import games
import policy as policy_lib

# ----------------------------------------------------------------------------------------- rollouts


def make_game(name: str, split: str, opponent: str, nested_reward: str = "mean"):
    """A game whose scripted seats play `opponent` where that names a scripted player (TicTacToe).
    A name such as "matrix>tictactoe>spy" makes a nested game of those games in that order."""
    options = {"tictactoe": {"opponent": opponent}} if not is_llm_opponent(opponent) else {}
    if ">" in name:
        from nested import NestedGame
        return NestedGame(name.split(">"), split, nested_reward, options)
    return games.make(name, split=split, **options.get(name, {}))


def is_llm_opponent(spec: str) -> bool:
    return spec == "self" or spec.startswith("model:")


def parse_opponent(spec: str) -> str:
    if (is_llm_opponent(spec) and spec != "model:") or spec in ("random", "expert"):
        return spec
    try:
        games.parse_opponent(spec)
    except ValueError:
        raise ValueError(f"--opponent must be random, expert, eps:P (0<=P<=1), self or model:PATH; got {spec!r}") from None
    return spec


def rollout(learner, episodes, temperature=1.0, max_new_tokens=24, seed=0, opponent=None):
    """Play every game in `episodes` to the end, all at once. Non-learner seats are played by `opponent`
    (a Policy) when given, else by the games' scripted players. Returns the learner's ChatBatch."""
    batch = policy_lib.ChatBatch(learner, len(episodes), seed)
    seats = max(g.num_seats for g in episodes)
    other = policy_lib.ChatBatch(opponent, len(episodes) * seats, seed + 1) if opponent is not None else None
    live = set(range(len(episodes)))
    while live:
        mine, theirs, ended = [], [], []
        for i in sorted(live):
            g = episodes[i]
            while not g.done and g.to_move != g.learner_seat and other is None:
                g.step(g.to_move, g.scripted_reply(g.to_move))
            if g.done:
                ended.append(i)
            elif g.to_move == g.learner_seat:
                mine.append(i)
            else:
                theirs.append(i * seats + g.to_move)
        live -= set(ended)
        batch.finish(ended)
        if other is not None:
            other.finish([i * seats + s for i in ended for s in range(seats)])
        for model_batch, rows in ((batch, mine), (other, theirs)):
            if not rows:
                continue
            located = [(r, r) if model_batch is batch else (r // seats, r) for r in rows]
            for i, r in located:
                model_batch.add_user(r, episodes[i].prompt(episodes[i].to_move))
            for (i, r), text in zip(located, model_batch.generate(rows, max_new_tokens, temperature)):
                episodes[i].step(episodes[i].to_move, text)
    return batch


def game_stats(episodes) -> dict[str, float]:
    """Per game (a nested episode counts once for each of its sub-games): win/draw/loss rates of the
    learner seat and its invalid replies per episode."""
    stats = {}
    played = [sub for g in episodes for sub in getattr(g, "subgames", [g])]
    for name in sorted({g.name for g in played}):
        mine = [g for g in played if g.name == name]
        for outcome in ("win", "draw", "loss"):
            stats[f"{name}/{outcome}"] = sum(g.outcome(g.learner_seat) == outcome for g in mine) / len(mine)
        stats[f"{name}/invalid"] = sum(g.invalid[g.learner_seat] for g in mine) / len(mine)
    return stats


# ---------------------------------------------------------------------------------------------- GRPO
def group_advantages(rewards: torch.Tensor, scale: str = "group", top_fraction: float = 1.0):
    """rewards: [groups, G]. Returns advantages [groups, G] and the mask of groups that are kept
    (reward spread > 0, and among the top `top_fraction` of groups by spread)."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, unbiased=False, keepdim=True)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (std + 1e-4)
    keep = std.squeeze(1) > 0
    if top_fraction < 1.0 and keep.any():
        k = max(1, round(top_fraction * len(rewards)))
        keep &= torch.zeros_like(keep).scatter(0, std.squeeze(1).topk(k).indices, True)
    return advantages, keep


def grpo_loss(logp, logp_old, logp_ref, advantages, mask, eps_low=0.2, eps_high=0.28, beta=0.04,
              aggregation="token", normalizer=None):
    """The clipped GRPO objective with a k3 KL penalty. Tensors are [sequences, tokens]; `advantages` is
    [sequences]; `mask` is 1 on the learner's sampled tokens. The sum over tokens (or over sequences' means)
    is divided by `normalizer`, by default this batch's learner tokens (or sequences); `update` passes the
    step's count per minibatch, so that every token of the step weighs the same whatever its minibatch.
    Returns the loss and per-token diagnostics."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    k3 = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1 if logp_ref is not None else torch.zeros_like(logp)
    per_token = -surrogate + beta * k3
    if aggregation == "token":
        loss = (per_token * mask).sum() / (normalizer or mask.sum().clamp(min=1))
    else:  # mean over each sequence's tokens, then over sequences
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / (normalizer or len(mask))
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, {"kl": k3, "clipped": clipped.float(), "ratio": ratio}


def training_tensors(batch, rows):
    """The learner's sequences for `rows`: token ids, the mask of sampled tokens and their sampling-time
    log-probs, shifted by one so that position t holds the prediction of token t+1."""
    width = max(len(batch.ids[r]) for r in rows) - 1
    mask = torch.zeros(len(rows), width)
    logp_old = torch.zeros(len(rows), width)
    for k, r in enumerate(rows):
        n = len(batch.ids[r]) - 1
        mask[k, :n] = torch.tensor(batch.sampled[r][1:], dtype=torch.float)
        logp_old[k, :n] = torch.tensor(batch.logprobs[r][1:])
    return [batch.ids[r] for r in rows], mask, logp_old


def update(learner, reference, optimizer, batch, rows, advantages, args, step=0) -> dict[str, float]:
    """Several minibatch updates over the kept episodes `rows` of one rollout batch."""
    dev = learner.device
    # Minibatches of similar lengths waste little compute on padding, and a group's episodes stay together
    # so that their shared prompt runs once (token_logprobs' groups); the minibatches' order is shuffled.
    group = {r: r // args.group_size for r in rows}
    longest = {g: max(len(batch.ids[r]) for r in rows if group[r] == g) for g in group.values()}
    by_length = sorted(rows, key=lambda r: (longest[group[r]], group[r], len(batch.ids[r])))
    chunks = [c for c in np.array_split(by_length, args.minibatches) if len(c)]
    chunks = random.Random(f"{args.seed}:{step}").sample(chunks, len(chunks))
    # The loss is the mean over the step's learner tokens (or sequences): each minibatch divides its sum by
    # the step's count per minibatch, not by its own count, so short (Matrix) episodes in a minibatch of
    # their own weigh no more per token than long ones; the step size stays that of a per-minibatch mean.
    learner_tokens = sum(sum(batch.sampled[r][1:]) for r in rows)
    normalizer = (learner_tokens if args.aggregation == "token" else len(rows)) / len(chunks)
    logs = {"loss": [], "kl": [], "clip_ratio": [], "entropy": [], "approx_kl": [], "grad_norm": []}
    seconds = {"reference_s": 0.0, "policy_s": 0.0}  # where the update's time goes
    learner.model.train()
    for chunk in chunks:
        chunk = [int(r) for r in chunk]
        seqs, mask, logp_old = training_tensors(batch, chunk)
        mask, logp_old = mask.to(dev), logp_old.to(dev)
        groups = [group[r] for r in chunk]
        started = time.time()
        logp_ref = None
        if args.beta > 0:
            with torch.no_grad():
                logp_ref = policy_lib.token_logprobs(reference, seqs, args.temperature, only=mask, groups=groups)
        seconds["reference_s"] += time.time() - started
        started = time.time()
        logp, entropy = policy_lib.token_logprobs(learner, seqs, args.temperature, with_entropy=True, only=mask,
                                                  groups=groups)
        adv = torch.tensor([advantages[r] for r in chunk], device=dev)
        loss, diag = grpo_loss(logp, logp_old, logp_ref, adv, mask, args.eps_low, args.eps_high, args.beta,
                               args.aggregation, normalizer)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(learner.model.parameters(), 1.0)
        optimizer.step()
        seconds["policy_s"] += time.time() - started
        n = mask.sum().clamp(min=1)
        log_ratio = (logp - logp_old).detach()
        for key, value in (("loss", loss), ("kl", (diag["kl"] * mask).sum() / n),
                           ("clip_ratio", (diag["clipped"] * mask).sum() / n),
                           ("entropy", (entropy * mask).sum() / n),
                           ("approx_kl", (((log_ratio.exp() - 1) - log_ratio) * mask).sum() / n),
                           ("grad_norm", grad_norm)):
            logs[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
    learner.model.eval()
    return {**{k: float(np.mean(v)) for k, v in logs.items()}, **seconds}


# ------------------------------------------------------------------------------------------ training
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--games", default="matrix,tictactoe,spy", help="comma-separated games to train on")
    p.add_argument("--model", default="tiny", help="'tiny' (embedded, warm-started) or a local model folder")
    p.add_argument("--mode", default=None, choices=["nested", "mixed"],
                   help="with several games: nested (one episode plays them all in order; the default) or mixed "
                        "(each episode one game, drawn uniformly)")
    p.add_argument("--nested-reward", default="mean", choices=["mean", "min", "product"],
                   help="how a nested episode's return combines its sub-games' (mean is GIFT's)")
    p.add_argument("--budget-turns", type=int, default=0,
                   help="stop once the learner has played this many turns (0: run all --steps)")
    p.add_argument("--budget-tokens", type=int, default=0,
                   help="stop once the learner has generated this many tokens (0: run all --steps)")
    p.add_argument("--opponent", default="random",
                   help="other seats: random | expert | eps:P (TicTacToe's scripted player; Spy always uses "
                        "its scripted lexicon players), self (a frozen copy of the learner) or model:PATH")
    p.add_argument("--self-refresh", type=int, default=10, help="with --opponent self: refresh the copy every K steps")
    p.add_argument("--steps", type=int, default=100, help="GRPO steps (100 keep the default run, install and "
                   "warm start included, within 15 minutes on a 2-core CPU)")
    p.add_argument("--instances", type=int, default=4, help="B: game instances (seeds) per step")
    p.add_argument("--group-size", type=int, default=8, help="G: episodes per instance (at least 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--beta", type=float, default=0.04, help="weight of the k3 KL to the start model (0: no reference)")
    p.add_argument("--eps-low", type=float, default=0.2, help="ratio clip below 1")
    p.add_argument("--eps-high", type=float, default=0.28, help="ratio clip above 1")
    p.add_argument("--minibatches", type=int, default=2, help="optimizer steps per rollout batch")
    p.add_argument("--aggregation", default="token", choices=["token", "sequence"],
                   help="loss mean over all learner tokens, or per sequence then over sequences")
    p.add_argument("--scale-rewards", default="group", choices=["group", "none"], help="divide advantages by the group std")
    p.add_argument("--top-groups", type=float, default=1.0, help="keep only this fraction of groups, by reward spread")
    p.add_argument("--max-new-tokens", type=int, default=24, help="cap on generated tokens per turn")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--eval-games", type=int, default=400, help="held-out games per game before and after (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="fixes the games, the sampling and the minibatch order (the tiny model's initial weights have their own fixed seed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="compute precision; weights and optimizer state stay float32 (auto: bf16 on a GPU that has it)")
    p.add_argument("--thinking", action="store_true",
                   help="let templates with a thinking switch (Qwen3) think; off by default, as replies are short")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory for long nested conversations, slower")
    p.add_argument("--run-dir", default=None, help="where metrics, transcripts and checkpoints go (default runs/<games>-seed<seed>)")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--transcripts", type=int, default=2, help="learner transcripts saved per step")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    args = p.parse_args(argv)
    try:
        args.games = games.game_names(args.games)
        parse_opponent(args.opponent)
        if args.group_size < 2:
            raise ValueError(f"--group-size must be at least 2 (GRPO compares episodes within a group), got {args.group_size}")
        if args.seed < 0:
            raise ValueError("--seed must be non-negative")
        for name in ("steps", "instances", "minibatches", "max_new_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < args.top_groups <= 1:
            raise ValueError("--top-groups must be in (0, 1]")
        if args.temperature <= 0:
            raise ValueError("--temperature must be > 0 for GRPO rollouts")
    except ValueError as error:
        p.exit(2, f"grpo.py: error: {error}\n")
    args.mode = "single" if len(args.games) == 1 else (args.mode or "nested")
    args.run_dir = Path(args.run_dir or f"runs/{args.mode}-{'-'.join(args.games)}-seed{args.seed}")
    return args


def step_instances(args, step: int) -> list[tuple[str, int]]:
    """The B (game, seed) instances of a step: a pure function of the seed and the step, so a resumed run
    draws the same games. Mixed: one game per group, drawn uniformly; nested: all games in order."""
    rng = random.Random(f"{args.seed}:{step}")
    names = [">".join(args.games) if args.mode == "nested" else rng.choice(args.games) for _ in range(args.instances)]
    return [(name, games.train_seed(args.seed, step, b)) for b, name in enumerate(names)]


def save_checkpoint(learner, optimizer, args, step, totals):
    state = {"step": step, "totals": totals, "optimizer": optimizer.state_dict(), "python": random.getstate(),
             "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    policy_lib.save_atomic(learner.model, learner.tokenizer, args.run_dir / "checkpoint", {"trainer_state.pt": state})


def keep_lines_up_to(path: Path, step: int, step_of):
    """After a crash the logs may run past the last checkpoint: drop the steps that will be redone."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip() and step_of(json.loads(line)) <= step]
        path.write_text("".join(line + "\n" for line in lines))


def setup(args):
    """Models, optimizer and counters, fresh or from the run directory's checkpoint."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.run_dir / "checkpoint"
    if args.resume and not (checkpoint / "trainer_state.pt").exists():
        sys.exit(f"grpo.py: nothing to resume in {args.run_dir}")
    args.start_model = args.model if args.model != "tiny" else str(policy_lib.warm_start())
    load = lambda path: policy_lib.load_policy(path, args.device, args.precision, args.thinking)
    learner = load(str(checkpoint) if args.resume else args.start_model)
    if args.grad_checkpointing:
        policy_lib.checkpointing(learner.model, enable=True)
    reference = load(args.start_model) if args.beta > 0 else None
    opponent = None
    if args.opponent == "self":
        opponent = policy_lib.Policy(copy.deepcopy(learner.model), learner.tokenizer, "self", args.thinking,
                                     learner.precision)
    elif args.opponent.startswith("model:"):
        opponent = load(args.opponent[len("model:"):])
    optimizer = torch.optim.AdamW(learner.model.parameters(), lr=args.lr, weight_decay=0.0)
    step, totals = 0, {"turns": 0, "tokens": 0, "episodes": 0}
    if args.resume:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        step, totals = state["step"], state["totals"]
        keep_lines_up_to(args.run_dir / "metrics.jsonl", step, lambda m: m["step"])
        keep_lines_up_to(args.run_dir / "transcripts.jsonl", step, lambda t: t["meta"]["step"])
    else:
        for name in ("metrics.jsonl", "transcripts.jsonl"):
            (args.run_dir / name).unlink(missing_ok=True)
    (args.run_dir / "config.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                          for k, v in vars(args).items()}, indent=1))
    return learner, reference, opponent, optimizer, step, totals


def grpo_step(args, step, learner, reference, opponent, optimizer, totals) -> dict:
    """One GRPO step: roll out B groups of G episodes, score them, update; returns the step's metrics."""
    started = time.time()
    episodes = [make_game(name, "train", args.opponent, args.nested_reward).reset(seed)
                for name, seed in step_instances(args, step) for _ in range(args.group_size)]
    batch = rollout(learner, episodes, args.temperature, args.max_new_tokens, seed=games.train_seed(args.seed, step, 0),
                    opponent=opponent)
    rollout_seconds = time.time() - started
    rewards = torch.tensor([g.rewards[g.learner_seat] for g in episodes]).view(args.instances, args.group_size)
    advantages, keep = group_advantages(rewards, args.scale_rewards, args.top_groups)
    rows = [b * args.group_size + k for b in range(args.instances) if keep[b] for k in range(args.group_size)]
    logs = update(learner, reference, optimizer, batch, rows, advantages.flatten().tolist(), args, step) if rows else {}
    lengths = [sum(batch.sampled[r]) for r in range(len(episodes))]
    episode_tokens = float(np.mean([len(ids) for ids in batch.ids]))  # the learner's whole conversation
    turns = sum(m["role"] == "assistant" for msgs in batch.messages for m in msgs)
    totals["turns"] += turns
    totals["tokens"] += sum(lengths)
    totals["episodes"] += len(episodes)
    with open(args.run_dir / "transcripts.jsonl", "a") as f:
        for r in range(0, len(episodes), max(1, len(episodes) // max(1, args.transcripts)))[:args.transcripts]:
            g = episodes[r]
            f.write(json.dumps({"messages": batch.messages[r], "meta": {
                "step": step + 1, "game": g.name, "seed": g.seed, "reward": g.rewards[g.learner_seat]}}) + "\n")
    return {"step": step + 1, "reward": rewards.mean().item(), "reward_std": rewards.std(1, unbiased=False).mean().item(),
            "frac_reward_zero_std": (rewards.std(1) == 0).float().mean().item(),
            "completion_length": float(np.mean(lengths)), "episode_tokens": episode_tokens, **logs, **game_stats(episodes),
            "learner_turns": turns, "learner_tokens": int(sum(lengths)), "total_episodes": totals["episodes"],
            "total_learner_turns": totals["turns"], "total_learner_tokens": totals["tokens"],
            "tokens_per_s": batch.new_tokens / rollout_seconds, "rollout_s": rollout_seconds,
            "step_s": time.time() - started}


def train(args):
    learner, reference, opponent, optimizer, first_step, totals = setup(args)
    import evaluate
    before_path = args.run_dir / "before.json"
    if args.eval_games and not before_path.exists():
        before_path.write_text(json.dumps(evaluate.score(learner, args.games, args.eval_games, opponent=args.opponent)))
    # With a budget the bar counts what the budget counts (learner turns or tokens), else steps.
    unit = "turns" if args.budget_turns else "tokens" if args.budget_tokens else None
    bar = tqdm(total=args.budget_turns or args.budget_tokens or args.steps, unit=f" {unit or 'step'}",
               initial=totals[unit] if unit else first_step, desc=f"GRPO ({args.mode})")
    for step in range(first_step, args.steps):
        if args.opponent == "self" and step % args.self_refresh == 0:
            opponent.model.load_state_dict(learner.model.state_dict())
        metrics = grpo_step(args, step, learner, reference, opponent, optimizer, totals)
        with open(args.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{metrics.get('kl', 0):.3f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}", s_step=f"{metrics['step_s']:.1f}")
        bar.update(metrics[f"learner_{unit}"] if unit else 1)
        over_budget = (args.budget_turns and totals["turns"] >= args.budget_turns) or \
                      (args.budget_tokens and totals["tokens"] >= args.budget_tokens)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or over_budget:
            save_checkpoint(learner, optimizer, args, step + 1, totals)
        if over_budget:
            break
    bar.close()
    print(f"consumed: {totals['episodes']} episodes, {totals['turns']} learner turns, "
          f"{totals['tokens']} learner tokens ({args.mode})")
    if args.eval_games:
        after = evaluate.score(learner, args.games, args.eval_games, opponent=args.opponent)
        table = evaluate.before_after_table(json.loads(before_path.read_text()), after)
        print(table)
        (args.run_dir / "before_after.md").write_text(table + "\n")
    return learner


def main(argv=None):
    args = parse_args(argv)
    train(args)


if __name__ == "__main__":
    main()
