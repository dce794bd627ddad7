"""GRPO on text games, from scratch: `python grpo.py --games matrix,tictactoe,spy`.

One step, top to bottom (grpo_step):
  1. plan:   B game instances (seeds); each is played G times, a group: same seed, same seat, same words
             (nested.py: nested episodes chain all the games, mixed ones draw one game per group).
  2. play:   all B*G episodes advance together; each turn is one batched generation call per model over
             every episode waiting on it (policy.play); scripted seats act in place.
  3. reward: the learner's whole conversation is one token sequence; its return R is the game reward plus
             the invalid-reply penalties (-0.1 each; a nested episode combines its sub-games' returns).
  4. advantages, per group:  A_i = (R_i - mean(R_group)) / (std(R_group) + 1e-4)   (population std;
             --scale-rewards none: no division). Groups whose rewards are all equal are dropped (--top-groups:
             only the top fraction by spread is kept). Causal credit (nested, mean reward; the default there):
             sub-game k's tokens get A_ik from the mean's part from sub-game k on, as no reply changes a
             sub-game already over.
  5. update: per token t of episode i that the learner sampled (game-master and opponent text is masked out):
                 r_t   = exp(logp_t - logp_old_t)                                (logp_old: recorded while sampling)
                 k3_t  = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1    (KL to the frozen start model)
                 loss  = mean_t[ -min(r_t A_it, clip(r_t, 1 - eps_low, 1 + eps_high) A_it) + beta k3_t ]
             over a few minibatches, one AdamW step each (grad norm clipped at 1), so the ratio and the clip
             act from the second minibatch on. mean_t is over the learner tokens of the whole step (each
             minibatch divides its sum by the step's tokens per minibatch), so every token weighs the same.
  6. log:    reward, KL, clip fraction, entropy, per-game win rates, seconds per step, tokens per second.

Several processes: `torchrun --nproc_per_node N grpo.py ...` (or --nnodes M). Each rank plays whole groups,
gradients are summed over ranks and the loss is normalised by the whole step's learner tokens: N ranks make
one process's update. Rank 0 alone writes logs and checkpoints; gloo on CPU, nccl on GPUs (`Ranks`, at the end).

Simplifications: the reference model is the model training started from; an episode's text is what the
learner saw, in the games' own prompts; no value model, no reward model.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import evaluate
import games
import nested
import policy as policy_lib


# ---------------------------------------------------------------------------------- hyper-parameters
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--games", default="matrix,tictactoe,spy", help="comma-separated games to train on")
    p.add_argument("--model", default="tiny", help="'tiny' (embedded, warm-started), 'smollm2' (SmolLM2-135M-Instruct, "
                   "format-SFT'd first) or a local model folder")
    p.add_argument("--no-format-sft", action="store_true",
                   help="with --model smollm2: start GRPO from the model as shipped (it writes no answer tags)")
    p.add_argument("--mode", default=None, choices=["nested", "mixed"], help="with several games: nested (an episode "
                   "plays them all in order; the default) or mixed (an episode is one game, drawn uniformly)")
    p.add_argument("--nested-reward", default="mean", choices=list(nested.NESTED_REWARDS),
                   help="how a nested episode's return combines its sub-games' (mean is GIFT's)")
    p.add_argument("--credit", default=None, choices=["episode", "causal"], help="a nested episode's replies get the "
                   "whole return, or (causal, the default with the mean) the part of their sub-game and later ones")
    p.add_argument("--budget-turns", type=int, default=0,
                   help="stop once the learner has played this many turns (0: run all --steps)")
    p.add_argument("--opponent", default="random", help="other seats: random | expert | eps:P (TicTacToe's scripted "
                   "player; Spy's are always scripted), self (a frozen copy of the learner) or model:PATH")
    p.add_argument("--self-refresh", type=int, default=10, help="with --opponent self: refresh the copy every K steps")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps; default 250 (the default run, install and "
                   "warm start included, within 15 minutes on a 2-core CPU), or as many as a budget takes")
    p.add_argument("--instances", type=int, default=4, help="B: game instances (seeds) per step")
    p.add_argument("--group-size", type=int, default=8, help="G: episodes per instance (at least 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--beta", type=float, default=0.04, help="weight of the k3 KL to the start model (0: no reference)")
    p.add_argument("--eps-low", type=float, default=0.2, help="ratio clip below 1")
    p.add_argument("--eps-high", type=float, default=0.28, help="ratio clip above 1")
    p.add_argument("--minibatches", type=int, default=2, help="optimizer steps per rollout batch")
    p.add_argument("--scale-rewards", default="group", choices=["group", "none"],
                   help="divide advantages by the group std")
    p.add_argument("--top-groups", type=float, default=1.0, help="keep only this fraction of groups, by reward spread")
    p.add_argument("--max-new-tokens", type=int, default=24, help="cap on generated tokens per turn")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--eval-games", type=int, default=400, help="held-out games per game before and after (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="fixes the games, the sampling and the minibatch order "
                   "(the tiny model's initial weights have their own fixed seed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="compute precision; weights and optimizer state stay float32 (auto: bf16 on a GPU that has it)")
    p.add_argument("--thinking", action="store_true",
                   help="let templates with a thinking switch (Qwen3) think; off by default, as replies are short")
    p.add_argument("--train-layers", type=int, default=0, help="train only the top N decoder layers and the final "
                   "norm (0: every weight): less compute and memory per step, at a cost to learning")
    p.add_argument("--micro-batch-gb", type=float, default=4.0, help="activations per forward and backward: "
                   "minibatches are split into pieces of about this many GB (same gradient)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory for long nested conversations, slower")
    p.add_argument("--run-dir", default=None,
                   help="where metrics, transcripts and checkpoints go (default runs/<mode>-<games>-seed<seed>)")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--transcripts", type=int, default=2, help="learner transcripts saved per step")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 10 ** 9 if args.budget_turns else 250
    problems = [message for ok, message in [
        (args.group_size >= 2, "--group-size must be at least 2 (GRPO compares episodes within a group)"),
        (min(args.steps, args.instances, args.minibatches, args.max_new_tokens) >= 1,
         "--steps, --instances, --minibatches and --max-new-tokens must be at least 1"),
        (args.seed >= 0 and args.train_layers >= 0, "--seed and --train-layers must be non-negative"),
        (args.micro_batch_gb > 0 and args.temperature > 0, "--micro-batch-gb and --temperature must be > 0"),
        (0 < args.top_groups <= 1, "--top-groups must be in (0, 1]"),
        (args.credit != "causal" or args.nested_reward == "mean", "--credit causal needs --nested-reward mean")] if not ok]
    try:
        args.games = games.game_names(args.games)
        nested.check_opponent(args.opponent)
    except ValueError as error:
        problems.insert(0, str(error))
    if problems:
        p.exit(2, f"grpo.py: error: {problems[0]}\n")
    args.mode = "single" if len(args.games) == 1 else (args.mode or "nested")
    args.credit = args.credit or ("causal" if args.mode == "nested" and args.nested_reward == "mean" else "episode")
    args.run_dir = Path(args.run_dir or f"runs/{args.mode}-{'-'.join(args.games)}-seed{args.seed}")
    return args


# ---------------------------------------------------------------------------------------------- GRPO
def group_advantages(returns: torch.Tensor, scale: str = "group", top_fraction: float = 1.0):
    """returns: [groups, G] or [groups, G, parts], normalised within each group (dimension 1). Returns the
    advantages and the mask of groups that are kept: a spread of the whole return (part 0) above zero, and
    among the top `top_fraction` of groups by that spread."""
    std = returns.std(1, unbiased=False, keepdim=True)
    advantages = returns - returns.mean(1, keepdim=True)
    if scale == "group":
        advantages = advantages / (std + 1e-4)
    spread = std.flatten(1)[:, 0]
    keep = spread > 0
    if top_fraction < 1.0 and keep.any():
        keep &= torch.zeros_like(keep).scatter(0, spread.topk(max(1, round(top_fraction * len(keep)))).indices, True)
    return advantages, keep


def grpo_loss(logp, logp_old, logp_ref, advantages, mask, eps_low=0.2, eps_high=0.28, beta=0.04, normalizer=None):
    """The clipped GRPO objective with a k3 KL penalty. Tensors are [sequences, tokens] (`advantages` may be
    [sequences]); `mask` is 1 on the learner's sampled tokens. The sum over tokens is divided by `normalizer`
    (default: this batch's learner tokens). Returns the loss and per-token diagnostics."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    k3 = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1 if logp_ref is not None else torch.zeros_like(logp)
    per_token = -surrogate + beta * k3
    loss = (per_token * mask).sum() / (normalizer or mask.sum().clamp(min=1))
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, {"kl": k3, "clipped": clipped.float(), "ratio": ratio}


def token_advantages(sampled: list[int], reply_advantages: list[float]) -> list[float]:
    """Spread one advantage per learner reply over its tokens: each reply's sampled tokens are one unbroken
    run of `sampled` (every reply samples at least one token; prompts and forced end tokens separate them)."""
    out, reply = [], -1
    for i, s in enumerate(sampled):
        reply += s and not (i and sampled[i - 1])
        out.append(reply_advantages[reply] if s else 0.0)
    return out


def training_tensors(episodes: list[dict]):
    """Episodes (batch_episodes) as the update needs them: the token ids, and [episodes, tokens - 1] tensors
    of the sampled mask, the sampling-time log-probs and the advantages, shifted by one so that position t
    holds the prediction of token t + 1."""
    width = max(len(e["ids"]) for e in episodes) - 1
    tensors = {key: torch.zeros(len(episodes), width) for key in ("sampled", "logprobs", "advantages")}
    for k, e in enumerate(episodes):
        for key, t in tensors.items():
            t[k, :len(e["ids"]) - 1] = torch.tensor(e[key][1:], dtype=torch.float)
    return [e["ids"] for e in episodes], tensors["sampled"], tensors["logprobs"], tensors["advantages"]


def batch_episodes(batch, rows: list[int], reply_advantages: list[list[float]] | None = None, groups=None):
    """Rows of a policy.ChatBatch as episodes for the update ({"ids", "sampled", "logprobs", "advantages"} per
    token, and the "group" whose episodes share a prompt), with each reply's advantage on its tokens."""
    return [{"ids": batch.ids[r], "sampled": batch.sampled[r], "logprobs": batch.logprobs[r], "group": (groups or rows)[k],
             "advantages": token_advantages(batch.sampled[r], reply_advantages[k]) if reply_advantages else
             [0.0] * len(batch.ids[r])} for k, r in enumerate(rows)]


def plan_minibatches(lengths: dict[int, int], group_size: int, n: int, seed: str) -> list[list[int]]:
    """Split the kept episodes (`lengths`: episode -> its sequence length) into n minibatches of similar
    lengths, which waste little compute on padding; a group's episodes stay together so that their shared
    prompt runs once (policy.token_logprobs' groups). The minibatches' order is shuffled by `seed`."""
    longest = {}
    for r, n_tokens in lengths.items():
        longest[r // group_size] = max(longest.get(r // group_size, 0), n_tokens)
    by_length = sorted(lengths, key=lambda r: (longest[r // group_size], r // group_size, lengths[r]))
    chunks = [[int(r) for r in c] for c in np.array_split(by_length, n) if len(c)]
    return random.Random(seed).sample(chunks, len(chunks))


def micro_batches(episodes: list[dict], max_tokens: int) -> list[list[dict]]:
    """`episodes` (as planned: a group's side by side, so their shared prompt runs once) in consecutive
    pieces of at most `max_tokens` padded tokens each; a piece holds at least one episode."""
    pieces, piece = [], []
    for e in episodes:
        if piece and (len(piece) + 1) * max(len(x["ids"]) for x in piece + [e]) > max_tokens:
            pieces.append(piece)
            piece = []
        piece.append(e)
    return pieces + [piece] if piece else pieces


def micro_batch_tokens(config, gigabytes: float) -> int:
    """Padded tokens per forward and backward whose saved float32 activations come to about `gigabytes`: per
    token and layer ~6 hidden-size and 4 intermediate-size values and a 1,024-position row of attention
    weights per head (SmolLM2: ~2.3 MB per token; the tiny model: ~50 kB, so its steps never split)."""
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size  # GPT-2 names it n_inner
    per_token = 4 * config.num_hidden_layers * (6 * config.hidden_size + 4 * intermediate
                                                 + 1024 * config.num_attention_heads)
    return max(1, int(gigabytes * 1e9 / per_token))


def update(learner, reference, optimizer, minibatches: list[list[dict]], normalizer: float, ranks, args) -> dict:
    """One AdamW step per minibatch of this rank's episodes (batch_episodes), the gradient summed over ranks
    before each step. `normalizer`: the step's learner tokens per minibatch. `args`: temperature, eps_low,
    eps_high, beta and micro_batch_gb (activations per forward and backward, see micro_batch_tokens)."""
    dev = learner.device
    sums = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "entropy": 0.0, "approx_kl": 0.0, "tokens": 0.0}
    grad_norms, seconds = [], {"reference_s": 0.0, "policy_s": 0.0}  # where the update's time goes
    params, max_tokens = trainable(learner.model), micro_batch_tokens(learner.model.config, args.micro_batch_gb)
    learner.model.train()
    for minibatch in minibatches:
        optimizer.zero_grad()
        for piece in micro_batches(minibatch, max_tokens):  # pieces whose activations fit in memory
            seqs, mask, logp_old, adv = (x.to(dev) if torch.is_tensor(x) else x for x in training_tensors(piece))
            groups = [e["group"] for e in piece]
            started = time.time()
            logp_ref = None
            if args.beta > 0:
                with torch.no_grad():
                    logp_ref = policy_lib.token_logprobs(reference, seqs, args.temperature, only=mask, groups=groups)
            seconds["reference_s"] += time.time() - started
            started = time.time()
            logp, entropy = policy_lib.token_logprobs(learner, seqs, args.temperature, with_entropy=True, only=mask,
                                                      groups=groups)
            loss, diag = grpo_loss(logp, logp_old, logp_ref, adv, mask, args.eps_low, args.eps_high, args.beta,
                                   normalizer)
            loss.backward()
            seconds["policy_s"] += time.time() - started
            log_ratio = (logp - logp_old).detach()
            for key, value in (("loss", loss), ("kl", diag["kl"]), ("clip_ratio", diag["clipped"]),
                               ("entropy", entropy), ("approx_kl", (log_ratio.exp() - 1) - log_ratio),
                               ("tokens", torch.ones_like(mask))):
                sums[key] += float(value.detach() if key == "loss" else (value.detach() * mask).sum())
        started = time.time()
        ranks.sum_gradients(params)
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        optimizer.step()
        seconds["policy_s"] += time.time() - started
    learner.model.eval()
    totals = dict(zip(sums, ranks.sum(list(sums.values()))))
    n = max(totals.pop("tokens"), 1.0)
    logs = {"loss": totals.pop("loss") / len(minibatches), **{k: v / n for k, v in totals.items()}}
    return {**logs, "grad_norm": float(np.mean(grad_norms)), **seconds}


# ------------------------------------------------------------------------------------ one GRPO step
def grpo_step(args, step, learner, reference, opponent, optimizer, totals, ranks) -> dict:
    """plan -> play -> rewards -> advantages -> update -> log; returns the step's metrics (every rank)."""
    started = time.time()
    G = args.group_size
    # 1. Plan: the step's B instances; this rank plays instances rank, rank + N, ... (whole groups).
    instances = nested.step_instances(args.games, args.mode, args.seed, step, args.instances)
    mine = list(range(ranks.rank, args.instances, ranks.world))
    episodes = [nested.make_game(instances[b][0], "train", args.opponent, args.nested_reward)
                .reset(instances[b][1]) for b in mine for _ in range(G)]
    # 2. Play. Each episode samples from its own stream, named by its instance's seed and its place in the group.
    keys = [(instances[b][1], k) for b in mine for k in range(G)]
    batch = policy_lib.play(learner, episodes, keys, args.temperature, args.max_new_tokens, opponent)
    rollout_seconds = time.time() - started
    # 3. Returns of every episode of the step, from every rank, in instance order: [B, G, parts], where part 0
    # is the episode's reward and, with causal credit, part k a sub-game's return-to-go.
    parts = ranks.gather([[nested.summary(episodes[i * G + k], batch, i * G + k, args.credit == "causal")
                           for k in range(G)] for i in range(len(mine))])  # rank r played instances r, r + N, ...
    summaries = [parts[b % ranks.world][b // ranks.world] for b in range(args.instances)]
    flat = [s for group in summaries for s in group]  # episode b * G + k of the step
    returns = torch.tensor([[s["returns"] for s in group] for group in summaries])
    rewards = returns[..., 0]
    # 4. Advantages per group and part; groups whose rewards are all equal are dropped.
    advantages, keep = group_advantages(returns, args.scale_rewards, args.top_groups)
    kept = [b * G + k for b in range(args.instances) if keep[b] for k in range(G)]
    # 5. Update: minibatches planned over the step's kept episodes alike on every rank, each rank training its own.
    logs = {}
    if kept:
        plan = plan_minibatches({e: flat[e]["length"] for e in kept}, G, args.minibatches, f"{args.seed}:{step}")
        my_episodes = {}  # this rank's kept episodes by their number in the step (instance mine[i]: rows i * G + k)
        for i, b in enumerate(mine):
            if not keep[b]:
                continue
            for k in range(G):
                reply_advantages = [float(advantages[b, k, p]) for p in flat[b * G + k]["parts"]]
                my_episodes[b * G + k], = batch_episodes(batch, [i * G + k], [reply_advantages], [b])
        count = sum(flat[e]["tokens"] for e in kept)
        logs = update(learner, reference, optimizer, [[my_episodes[e] for e in chunk if e in my_episodes]
                                                      for chunk in plan], count / len(plan), ranks, args)
    # 6. Log.
    turns, tokens = sum(s["turns"] for s in flat), sum(s["tokens"] for s in flat)
    totals["turns"] += turns
    totals["tokens"] += tokens
    totals["episodes"] += len(flat)
    if ranks.main:
        save_transcripts(args, step, episodes, batch)
    new_tokens, slowest_rollout = ranks.sum([batch.new_tokens])[0], ranks.sum([rollout_seconds], "MAX")[0]
    return {"step": step + 1, "reward": rewards.mean().item(),
            "reward_std": rewards.std(1, unbiased=False).mean().item(),
            "frac_reward_zero_std": (rewards.std(1) == 0).float().mean().item(),
            "completion_length": tokens / len(flat), "episode_tokens": float(np.mean([s["length"] for s in flat])),
            **logs, **nested.game_stats([r for s in flat for r in s["results"]]),
            "learner_turns": turns, "learner_tokens": tokens, "total_episodes": totals["episodes"],
            "total_learner_turns": totals["turns"], "total_learner_tokens": totals["tokens"],
            "tokens_per_s": new_tokens / slowest_rollout, "rollout_s": slowest_rollout, "step_s": time.time() - started}


def save_transcripts(args, step, episodes, batch):
    with open(args.run_dir / "transcripts.jsonl", "a") as f:
        for r in range(0, len(episodes), max(1, len(episodes) // max(1, args.transcripts)))[:args.transcripts]:
            g = episodes[r]
            f.write(json.dumps({"messages": batch.messages[r], "meta": {
                "step": step + 1, "game": g.name, "seed": g.seed, "reward": g.rewards[g.learner_seat]}}) + "\n")


# ------------------------------------------------------------------------------------------- the run
def setup(args, ranks):
    """Models, optimizer and counters, fresh or from the run directory's checkpoint."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    checkpoint = args.run_dir / "checkpoint"
    if args.resume and not (checkpoint / "trainer_state.pt").exists():
        sys.exit(f"grpo.py: nothing to resume in {args.run_dir}")
    start = "smollm2-sft" if args.model == "smollm2" and not args.no_format_sft else args.model
    if ranks.main:
        policy_lib.model_path(start)  # a named model is built once (minutes), by rank 0, while the others wait
    ranks.barrier()
    args.start_model = policy_lib.model_path(start)
    device = f"cuda:{ranks.local}" if ranks.world > 1 and torch.cuda.is_available() else args.device
    load = lambda path: policy_lib.load_policy(path, device, args.precision, args.thinking)
    learner = load(str(checkpoint) if args.resume else args.start_model)
    if args.grad_checkpointing:
        policy_lib.checkpointing(learner.model, enable=True)
    if args.train_layers:
        train_top_layers(learner.model, args.train_layers)
    reference = load(args.start_model) if args.beta > 0 else None
    opponent = None
    if args.opponent == "self":
        opponent = policy_lib.Policy(copy.deepcopy(learner.model), learner.tokenizer, "self", args.thinking,
                                     learner.precision)
    elif args.opponent.startswith("model:"):
        opponent = load(args.opponent[len("model:"):])
    optimizer = torch.optim.AdamW(trainable(learner.model), lr=args.lr, weight_decay=0.0)
    step, totals = 0, {"turns": 0, "tokens": 0, "episodes": 0}
    if args.resume:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        step, totals = state["step"], state["totals"]
    if ranks.main:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        keep_lines_up_to(args.run_dir / "metrics.jsonl", step, lambda m: m["step"])
        keep_lines_up_to(args.run_dir / "transcripts.jsonl", step, lambda t: t["meta"]["step"])
        if not args.resume:  # a fresh run in an old folder: its evaluation before training is redone too
            (args.run_dir / "before.json").unlink(missing_ok=True)
        (args.run_dir / "config.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()}, indent=1))
    return learner, reference, opponent, optimizer, step, totals


def train_top_layers(model, n: int):
    """Freeze every weight but the top `n` decoder layers and the final norm: backward stops there."""
    layers = model.get_decoder().layers
    if not 0 < n <= len(layers):
        raise SystemExit(f"grpo.py: --train-layers must be in 1..{len(layers)} for this model, got {n}")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [*layers[len(layers) - n:].parameters(), *model.get_decoder().norm.parameters()]:
        p.requires_grad_(True)


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def keep_lines_up_to(path: Path, step: int, step_of):
    """After a crash the logs may run past the last checkpoint: drop the steps that will be redone."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip() and step_of(json.loads(line)) <= step]
        path.write_text("".join(line + "\n" for line in lines))


def save_checkpoint(learner, optimizer, args, step, totals, ranks):
    if ranks.main:
        state = {"step": step, "totals": totals, "optimizer": optimizer.state_dict(), "python": random.getstate(),
                 "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        policy_lib.save_atomic(learner.model, learner.tokenizer, args.run_dir / "checkpoint",
                               {"trainer_state.pt": state})
    ranks.barrier()  # no rank runs ahead of a checkpoint that it may have to resume from


def held_out_scores(learner, args, ranks) -> dict:
    """Held-out games of every game, split between the ranks, scored together."""
    return {name: evaluate.summarize(name, [r for part in ranks.gather(evaluate.play_games(
        learner, name, range(ranks.rank, args.eval_games, ranks.world), opponent=args.opponent)) for r in part])
        for name in args.games}


def train(args, ranks=None):
    ranks = ranks or Ranks()
    learner, reference, opponent, optimizer, first_step, totals = setup(args, ranks)
    before_path = args.run_dir / "before.json"
    if args.eval_games and ranks.gather(not before_path.exists())[0]:  # rank 0's files decide
        before = held_out_scores(learner, args, ranks)
        if ranks.main:
            before_path.write_text(json.dumps(before))
    # With a budget the bar counts learner turns, else steps.
    unit = "turns" if args.budget_turns else None
    bar = tqdm(total=args.budget_turns or args.steps, unit=f" {unit or 'step'}",
               initial=totals[unit] if unit else first_step, desc=f"GRPO ({args.mode})", disable=not ranks.main)
    for step in range(first_step, args.steps):
        if args.opponent == "self" and step % args.self_refresh == 0:
            opponent.model.load_state_dict(learner.model.state_dict())
        metrics = grpo_step(args, step, learner, reference, opponent, optimizer, totals, ranks)
        if ranks.main:
            with open(args.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{metrics.get('kl', 0):.3f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}", s_step=f"{metrics['step_s']:.1f}")
        bar.update(metrics[f"learner_{unit}"] if unit else 1)
        over_budget = args.budget_turns and totals["turns"] >= args.budget_turns
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or over_budget:
            save_checkpoint(learner, optimizer, args, step + 1, totals, ranks)
        if over_budget:
            break
    bar.close()
    if ranks.main:
        print(f"consumed: {totals['episodes']} episodes, {totals['turns']} learner turns, "
              f"{totals['tokens']} learner tokens ({args.mode})")
    if args.eval_games:
        after = held_out_scores(learner, args, ranks)
        if ranks.main:
            table = evaluate.before_after_table(json.loads(before_path.read_text()), after)
            print(table)
            (args.run_dir / "before_after.md").write_text(table + "\n")
    return learner


# -------------------------------------------------------------------------- several processes (torchrun)
class Ranks:
    """This process's place among the processes `torchrun` started (from its environment variables), and
    the few collective operations the step needs. Without torchrun: one process, and each is a no-op."""

    def __init__(self, timeout_s: float = 1800):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank, self.local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0
        if self.world > 1 and not dist.is_initialized():
            # A rank that dies makes the others' next collective fail after `timeout_s` rather than hang
            # (torchrun also stops the other ranks as soon as one exits with an error).
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.device = torch.device(f"cuda:{self.local}") if dist.is_initialized() and dist.get_backend() == "nccl" \
            else torch.device("cpu")

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float], op: str = "SUM") -> list[float]:
        """Each value summed over the ranks (op "MAX": the largest)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def sum_gradients(self, parameters):
        """Sum each gradient over the ranks (a rank without episodes in a minibatch adds zeros): with the loss
        divided by the whole step's token count, the sum is the gradient one process would compute."""
        if self.world == 1:
            return
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def main(argv=None):
    args = parse_args(argv)
    ranks = Ranks()
    try:
        train(args, ranks)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
