"""GRPO on text games, from scratch: `python grpo.py --games matrix,tictactoe,spy`.

One step, top to bottom (grpo_step):
  1. plan:    B game instances (seeds); each is played G times, a group: same seed, same seat, same
              words (nested.py: nested episodes chain all the games, mixed ones draw one per group).
  2. play:    all B*G episodes advance together; each turn is one batched generation call per model
              over every episode waiting on it (policy.play); scripted seats act in place.
  3. reward:  the learner's whole conversation is one token sequence; its return R is the game
              reward plus the invalid-reply penalties (-0.1 each; a nested episode combines its
              sub-games').
  4. advantage per group: A_i = (R_i - mean(R_group)) / (std(R_group) + 1e-4) (population std;
              --scale-rewards none: no division). Groups whose returns are all equal are dropped
              (--top-groups: only the top fraction by spread is kept). Causal credit (nested, mean
              reward; the default there): sub-game k's tokens get A_ik from the mean's part from
              sub-game k on, as no reply changes a sub-game already over.
  5. update:  per token t of episode i that the learner sampled (other text is masked out):
                r_t  = exp(logp_t - logp_old_t)              (logp_old: the policy before any step)
                k3_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1   (KL to the start*)
                loss = mean_t[-min(r_t A_it, clip(r_t, 1 - eps_low, 1 + eps_high) A_it) + beta k3_t]
              over a few minibatches, one AdamW step each (grad norm clipped at 1), so the ratio and
              the clip act from the second minibatch on. mean_t is over the learner tokens of the
              whole step (each minibatch divides its sum by the step's tokens per minibatch).
  6. log:     reward, KL, clip fraction, entropy, per-game win rates, seconds, tokens per second.

Several processes: `torchrun --nproc_per_node N grpo.py ...` (or --nnodes M). Each rank plays a
block of whole groups, gradients are summed over ranks and the loss is normalised by the whole
step's learner tokens: N ranks make one process's update. Rank 0 alone writes logs and checkpoints;
gloo on CPU, nccl on GPUs (`Ranks`, at the end).

Simplifications: the reference model is the model training started from (*--ref-reset K: the policy
as it was at the last multiple of K steps); an episode's text is what the learner saw, in the
games' own prompts; no value model, no reward model.
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


# ---------------------------------------------------------------------------------------- GRPO
def group_advantages(returns: torch.Tensor, scale: str = "group", top_fraction: float = 1.0):
    """returns: [groups, G, parts], normalised within each group (dimension 1). Returns the
    advantages and the mask of groups that are kept: a spread of the whole return (part 0) above
    zero, and among the top `top_fraction` of groups by that spread."""
    std = returns.std(1, unbiased=False, keepdim=True)
    advantages = returns - returns.mean(1, keepdim=True)
    if scale == "group":
        advantages = advantages / (std + 1e-4)
    spread = std.flatten(1)[:, 0]
    keep = spread > 0
    if top_fraction < 1.0 and keep.any():
        widest = spread.topk(max(1, round(top_fraction * len(keep)))).indices
        keep &= torch.zeros_like(keep).scatter(0, widest, True)
    return advantages, keep


def running_advantages(returns: torch.Tensor, roles: list[str], baselines: dict, decay=0.9):
    """--baseline running (SPIRAL's role-conditioned advantage): an episode's advantage is its
    return less the running mean of the returns of its role (game and seat), every group kept, so
    a group without spread still carries signal. The means (`baselines`, role -> one per part, kept
    in the checkpoint) then move a (1 - decay) step towards this step's. returns: [B, G, parts]."""
    flat = returns.flatten(0, 1)
    members = {r: [e for e, x in enumerate(roles) if x == r] for r in set(roles)}
    step_means = {r: flat[episodes].mean(0) for r, episodes in members.items()}
    base = torch.stack([torch.tensor(baselines.get(r, step_means[r].tolist())) for r in roles])
    for r, mean in step_means.items():
        old = torch.tensor(baselines.get(r, mean.tolist()))
        baselines[r] = (decay * old + (1 - decay) * mean).tolist()
    keep = torch.ones(returns.shape[0], dtype=torch.bool)
    return (flat - base).view(returns.shape), keep


def role(episode: games.Game) -> str:
    """The learner's role, for --baseline running: the game and the seat's role (TicTacToe: first
    or second; Spy: civilian or spy; nested: one role)."""
    seat = episode.learner_seat
    detail = getattr(episode, "roles", [getattr(episode, "role", "")] * episode.num_seats)[seat]
    return f"{episode.name}:{detail}"


def grpo_loss(logp, logp_old, logp_ref, advantages, mask, eps_low=0.2, eps_high=0.28, beta=0.04,
              normalizer=None):
    """The clipped GRPO objective with a k3 KL penalty, and per-token diagnostics. Tensors are
    [sequences, tokens] (`advantages` may be [sequences]); `mask` is 1 on the learner's sampled
    tokens; the sum over tokens is divided by `normalizer` (default: the batch's learner tokens)."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    k3 = torch.zeros_like(logp)
    if logp_ref is not None:
        k3 = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1
    per_token = -surrogate + beta * k3
    loss = (per_token * mask).sum() / (normalizer or mask.sum().clamp(min=1))
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, {"kl": k3, "clipped": clipped.float(), "ratio": ratio}


def draw_per_episode(episodes, keys):
    """Reseed the other seats' draws by episode, not instance: a deterministic policy's group
    then meets different opponent moves, so it keeps a spread and is not a fixed point."""
    for g, (_, k) in zip(episodes, keys):
        for sub in getattr(g, "subgames", [g]):
            sub.opponent_rng.seed(f"{sub.seed}:players:{k}")


# ------------------------------------------------------------------------------- one GRPO step
def grpo_step(args, step, learner, reference, opponent, optimizer, totals, ranks) -> dict:
    """Returns the step's metrics (every rank). Episode e of the step is game instance e // G,
    member e % G of its group, on every rank."""
    started = time.time()
    G = args.group_size
    # 1. Plan: the step's B instances. This rank plays the block first..last - 1 of them, whole
    # groups, so its ChatBatch row i is the step's episode first * G + i.
    instances = nested.step_instances(args.games, args.mode, args.seed, step, args.instances)
    first, last = ranks.block(args.instances)
    mine = instances[first:last]
    episodes = [nested.make_game(name, "train", args.opponent, args.nested_reward).reset(seed)
                for name, seed in mine for _ in range(G)]
    # 2. Play. Each episode samples from its own stream, named by its instance and its place in the
    # group.
    keys = [(seed, k) for _, seed in mine for k in range(G)]
    if args.episode_draws:
        draw_per_episode(episodes, keys)
    batch = policy_lib.play(learner, episodes, keys, args.temperature, args.max_new_tokens,
                            opponent)
    rollout_s = time.time() - started
    # 3. Returns of all the step's episodes, every rank's in order: [B, G, parts], where part 0 is
    # the episode's return and, with causal credit, part k a sub-game's return-to-go.
    causal = args.credit == "causal"
    summaries = ranks.concat([summary(g, batch, i, causal) for i, g in enumerate(episodes)])
    returns = torch.tensor([s["returns"] for s in summaries]).view(args.instances, G, -1)
    # 4. Advantages per group and part, [B * G, parts], and the groups kept.
    if args.baseline == "running":
        roles = ranks.concat([role(g) for g in episodes])
        advantages, keep = running_advantages(returns, roles, totals["baselines"])
    else:
        advantages, keep = group_advantages(returns, args.scale_rewards, args.top_groups)
    advantages = advantages.flatten(0, 1)
    kept = [e for e in range(args.instances * G) if keep[e // G]]
    # 5. Update: minibatches planned over the step's kept episodes alike on every rank; each rank
    # trains those it played.
    logs = {}
    if kept:
        plan = plan_minibatches({e: summaries[e]["length"] for e in kept}, args.minibatches,
                                f"{args.seed}:{step}")
        own = {e: training_episode(batch, e - first * G,
                                   [float(advantages[e, part]) for part in summaries[e]["parts"]])
               for e in kept if first * G <= e < last * G}
        minibatches = [[own[e] for e in chunk if e in own] for chunk in plan]
        tokens_per_minibatch = sum(summaries[e]["tokens"] for e in kept) / len(plan)
        logs = update(learner, reference, optimizer, minibatches, tokens_per_minibatch, ranks, args)
    # 6. Log.
    rewards = returns[..., 0]
    turns, tokens = sum(s["turns"] for s in summaries), sum(s["tokens"] for s in summaries)
    totals["turns"] += turns
    totals["tokens"] += tokens
    totals["episodes"] += len(summaries)
    if ranks.main:
        save_transcripts(args, step, episodes, batch)
    rollout_s = ranks.max(rollout_s)
    played = [r for s in summaries for r in s["results"]]
    return {"step": step + 1, "reward": rewards.mean().item(),
            "reward_std": rewards.std(1, unbiased=False).mean().item(),
            "frac_reward_zero_std": (rewards.std(1) == 0).float().mean().item(),
            "completion_length": tokens / len(summaries),
            "episode_tokens": float(np.mean([s["length"] for s in summaries])),
            **logs, **nested.game_stats(played), "learner_turns": turns, "learner_tokens": tokens,
            "total_episodes": totals["episodes"], "total_learner_turns": totals["turns"],
            "total_learner_tokens": totals["tokens"], "lr": optimizer.param_groups[0]["lr"],
            "tokens_per_s": ranks.sum([batch.new_tokens])[0] / rollout_s, "rollout_s": rollout_s,
            "step_s": time.time() - started}


def summary(episode: games.Game, batch, row: int, causal: bool) -> dict:
    """What the step needs of a played episode, row `row` of the learner's ChatBatch, small enough
    to send between ranks: returns by part, each reply's part (nested.credit), sizes, results."""
    parts, returns = nested.credit(episode, causal)
    turns = batch.turns(row)
    return {"returns": returns, "parts": parts or [0] * turns, "tokens": sum(batch.sampled[row]),
            "length": len(batch.ids[row]), "turns": turns, "results": nested.results(episode)}


def training_episode(batch, row: int, reply_advantages: list[float]) -> dict:
    """Row `row` of a ChatBatch as the update needs it: its token ids, and per token whether the
    learner sampled it, its log-prob then and its reply's advantage. A reply's sampled tokens are
    one unbroken run (prompts and forced end tokens separate them)."""
    sampled, advantages, reply = batch.sampled[row], [], -1
    for i, s in enumerate(sampled):
        reply += s and not (i and sampled[i - 1])
        advantages.append(reply_advantages[reply] if s else 0.0)
    return {"ids": batch.ids[row], "sampled": sampled, "logprobs": batch.logprobs[row],
            "advantages": advantages}


def plan_minibatches(lengths: dict[int, int], n: int, seed: str) -> list[list[int]]:
    """The kept episodes (episode -> sequence length) in n minibatches of similar lengths (little
    padding), in an order shuffled by `seed`."""
    by_length = sorted(lengths, key=lambda e: (lengths[e], e))
    chunks = [[int(e) for e in chunk] for chunk in np.array_split(by_length, n) if len(chunk)]
    return random.Random(seed).sample(chunks, len(chunks))


def as_tensors(episodes: list[dict], device) -> dict:
    """Episodes (training_episode) as the loss needs them: the token ids, and [episodes, longest -
    1] tensors of the sampled mask, the sampling-time log-probs and the advantages, shifted by one
    so that position t holds the prediction of token t + 1."""
    width = max(len(e["ids"]) for e in episodes) - 1
    out = {"ids": [e["ids"] for e in episodes]}
    for key, name in (("sampled", "mask"), ("logprobs", "logp_old"), ("advantages", "advantages")):
        out[name] = torch.zeros(len(episodes), width)
        for k, e in enumerate(episodes):
            out[name][k, :len(e["ids"]) - 1] = torch.tensor(e[key][1:], dtype=torch.float)
        out[name] = out[name].to(device)
    return out


def update(learner, reference, optimizer, minibatches: list[list[dict]], normalizer: float, ranks,
           args) -> dict:
    """One AdamW step per minibatch of this rank's episodes (training_episode), the gradient summed
    over ranks before each step. `normalizer`: the step's learner tokens per minibatch. Each
    minibatch runs in pieces whose activations take about args.micro_batch_gb (the same gradient).
    """
    T, params = args.temperature, trainable(learner.model)
    max_tokens = policy_lib.micro_batch_tokens(learner.model.config, args.micro_batch_gb)
    pieces = []
    for minibatch in minibatches:
        cuts = policy_lib.micro_batches([len(e["ids"]) for e in minibatch], max_tokens)
        pieces.append([as_tensors([minibatch[i] for i in cut], learner.device) for cut in cuts])
    learner.model.train()
    # Before any AdamW step: the reference's log-probs, and, where the rollout sampled from bf16
    # weights, the old log-probs again, by the training forward, so that the ratio starts at exactly
    # 1. The first minibatch needs none: its own forward comes before any step.
    recompute = learner.precision != "fp32"
    seconds = {"reference_s": 0.0, "old_s": 0.0, "policy_s": 0.0}
    sampler_kl = []  # between the sampling-time and the training-time log-probs, where they differ
    with torch.no_grad():
        for m, piece in ((m, p) for m, mb in enumerate(pieces) for p in mb):
            started = time.time()
            piece["logp_ref"] = None
            if args.beta > 0:
                piece["logp_ref"] = policy_lib.token_logprobs(reference, piece["ids"],
                                                              piece["mask"], T)
            seconds["reference_s"] += time.time() - started
            started = time.time()
            if recompute and m > 0:
                logp_old = policy_lib.token_logprobs(learner, piece["ids"], piece["mask"], T)
                sampler_kl.append(k3_sum(piece["logp_old"], logp_old, piece["mask"]))
                piece["logp_old"] = logp_old
            seconds["old_s"] += time.time() - started
    sums = dict.fromkeys(("loss", "kl", "clip_ratio", "entropy", "tokens"), 0.0)
    grad_norms = []
    for m, minibatch in enumerate(pieces):
        started = time.time()
        optimizer.zero_grad()
        for piece in minibatch:
            logp, entropy = policy_lib.token_logprobs(learner, piece["ids"], piece["mask"], T,
                                                      with_entropy=True)
            if recompute and m == 0:
                sampler_kl.append(k3_sum(piece["logp_old"], logp.detach(), piece["mask"]))
                piece["logp_old"] = logp.detach()
            loss, diag = grpo_loss(logp, piece["logp_old"], piece["logp_ref"],
                                   piece["advantages"], piece["mask"], args.eps_low, args.eps_high,
                                   args.beta, normalizer)
            if args.entropy_coef:  # a bonus for spread-out predictions, against early collapse
                loss = loss - args.entropy_coef * (entropy * piece["mask"]).sum() / normalizer
            loss.backward()
            sums["loss"] += loss.item()
            for key, value in (("kl", diag["kl"]), ("clip_ratio", diag["clipped"]),
                               ("entropy", entropy), ("tokens", torch.ones_like(logp))):
                sums[key] += float((value.detach() * piece["mask"]).sum())
        ranks.sum_gradients(params)
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        optimizer.step()
        seconds["policy_s"] += time.time() - started
    learner.model.eval()
    totals = dict(zip(sums, ranks.sum(list(sums.values()))))
    tokens = max(totals.pop("tokens"), 1.0)
    logs = {"loss": totals.pop("loss") / len(minibatches)}
    logs.update({key: value / tokens for key, value in totals.items()})
    if recompute:
        logs["sampler_kl"] = ranks.sum([sum(sampler_kl)])[0] / tokens
    return {**logs, "grad_norm": float(np.mean(grad_norms)), **seconds}


def k3_sum(logp_sampling, logp_training, mask) -> float:
    """The k3 estimate of KL(sampling || training), summed over the masked (sampled) tokens."""
    log_ratio = (logp_training - logp_sampling) * mask
    return float(((torch.exp(log_ratio) - log_ratio - 1) * mask).sum())


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def save_transcripts(args, step, episodes, batch):
    every = max(1, len(episodes) // max(1, args.transcripts))
    with open(args.run_dir / "transcripts.jsonl", "a") as f:
        for r in range(0, len(episodes), every)[:args.transcripts]:
            g = episodes[r]
            meta = {"step": step + 1, "game": g.name, "seed": g.seed,
                    "reward": g.rewards[g.learner_seat]}
            f.write(json.dumps({"messages": batch.messages[r], "meta": meta}) + "\n")


# --------------------------------------------------------------------------------------- the run
def setup(args, ranks):
    """Models, optimizer and counters, fresh or from the run directory's checkpoint."""
    torch.manual_seed(args.seed)
    checkpoint = args.run_dir / "checkpoint"
    if args.resume and not (checkpoint / "trainer.json").exists():
        sys.exit(f"grpo.py: nothing to resume in {args.run_dir}")
    start = "smollm2-sft" if args.model == "smollm2" and not args.no_format_sft else args.model
    if ranks.main:
        policy_lib.model_path(start)  # a named model is built once, by rank 0, the others wait
    ranks.barrier()
    args.start_model = policy_lib.model_path(start)
    device = f"cuda:{ranks.local}" if ranks.world > 1 and torch.cuda.is_available() else args.device
    load = lambda path: policy_lib.load_policy(path, device, args.precision, args.thinking)
    learner = load(str(checkpoint) if args.resume else args.start_model)
    if args.grad_checkpointing:
        checkpoint_activations(learner.model)
    if args.train_layers:
        train_top_layers(learner.model, args.train_layers)
    if ranks.main:
        print(f"{args.model}: {learner.precision} compute, float32 weights ({learner.why})")
    reference = load(args.start_model) if args.beta > 0 else None
    opponent = None
    if args.opponent == "self":
        opponent = policy_lib.Policy(copy.deepcopy(learner.model), learner.tokenizer, "self",
                                     args.thinking, learner.precision)
    elif args.opponent.startswith("model:"):
        opponent = load(args.opponent[len("model:"):])
    optimizer = torch.optim.AdamW(trainable(learner.model), lr=args.lr, weight_decay=0.0)
    step, totals = 0, {"turns": 0, "tokens": 0, "episodes": 0, "baselines": {}}
    if args.resume:  # tensors and JSON only: a run folder from elsewhere cannot run code here
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        state = json.loads((checkpoint / "trainer.json").read_text())
        step, totals = state["step"], state["totals"]
    if ranks.main:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        keep_lines_up_to(args.run_dir / "metrics.jsonl", step, lambda m: m["step"])
        keep_lines_up_to(args.run_dir / "transcripts.jsonl", step, lambda t: t["meta"]["step"])
        if not args.resume:  # a fresh run in an old folder: its evaluation before is redone
            (args.run_dir / "before.json").unlink(missing_ok=True)
        (args.run_dir / "config.json").write_text(json.dumps(vars(args), indent=1, default=str))
    return learner, reference, opponent, optimizer, step, totals


def checkpoint_activations(model):
    """Recompute activations in backward (transformers 5.2x renamed gradient checkpointing)."""
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()


def train_top_layers(model, n: int):
    """Freeze all but the top `n` decoder layers and the final norm: backward stops there."""
    layers = model.get_decoder().layers
    if not 0 < n <= len(layers):
        raise SystemExit(f"grpo.py: --train-layers must be in 1..{len(layers)} for this model, "
                         f"got {n}")
    model.requires_grad_(False)
    for p in [*layers[-n:].parameters(), *model.get_decoder().norm.parameters()]:
        p.requires_grad_(True)


def keep_lines_up_to(path: Path, step: int, step_of):
    """After a crash the logs may run past the last checkpoint: drop the steps to be redone."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines()
                 if line.strip() and step_of(json.loads(line)) <= step]
        path.write_text("".join(line + "\n" for line in lines))


def save_checkpoint(learner, optimizer, args, step, totals, ranks):
    if ranks.main:
        extra = {"optimizer.pt": optimizer.state_dict(),
                 "trainer.json": {"step": step, "totals": totals}}
        policy_lib.save_atomic(learner.model, learner.tokenizer, args.run_dir / "checkpoint", extra)
    ranks.barrier()  # no rank runs ahead of a checkpoint that it may have to resume from


def held_out_scores(learner, args, ranks) -> dict:
    """Held-out games of every game, split between the ranks, scored together."""
    scores = {}
    for name in args.games:
        first, last = ranks.block(args.eval_games)
        played = evaluate.play_games(learner, name, range(first, last), opponent=args.opponent)
        scores[name] = evaluate.summarize(name, ranks.concat(played))
    return scores


def train(args, ranks=None):
    ranks = ranks or Ranks()
    learner, reference, opponent, optimizer, first_step, totals = setup(args, ranks)
    before_path = args.run_dir / "before.json"
    if args.eval_games and ranks.concat([not before_path.exists()])[0]:  # rank 0's files decide
        before = held_out_scores(learner, args, ranks)
        if ranks.main:
            before_path.write_text(json.dumps(before))
    # With a budget the bar counts learner turns, else steps.
    unit = "turns" if args.budget_turns else None
    bar = tqdm(total=args.budget_turns or args.steps, unit=f" {unit or 'step'}",
               initial=totals[unit] if unit else first_step, desc=f"GRPO ({args.mode})",
               disable=not ranks.main)
    for step in range(first_step, args.steps):
        # The frozen copies (self opponent, reset reference) are refreshed every K steps, and at
        # once when a run resumes.
        if args.opponent == "self" and (step % args.self_refresh == 0 or step == first_step):
            opponent.model.load_state_dict(learner.model.state_dict())
        if reference and args.ref_reset and (step % args.ref_reset == 0 or step == first_step):
            reference.model.load_state_dict(learner.model.state_dict())
        for group in optimizer.param_groups:  # a linear warm-up of the learning rate
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
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


# ------------------------------------------------------------------------------ hyper-parameters
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    # What is played
    add("--games", default="matrix,tictactoe,spy", help="comma-separated games to train on")
    add("--model", default="tiny", help="'tiny' (embedded, warm-started), 'smollm2' "
        "(SmolLM2-135M-Instruct, format-SFT'd first) or a local model folder")
    add("--no-format-sft", action="store_true",
        help="with --model smollm2: start from the model as shipped (it writes no answer tags)")
    add("--mode", default=None, choices=["nested", "mixed"], help="with several games: nested "
        "(an episode plays them all in order; the default) or mixed (an episode is one game)")
    add("--nested-reward", default="mean", choices=list(nested.NESTED_REWARDS),
        help="how a nested episode's return combines its sub-games' (mean is GIFT's)")
    add("--credit", default=None, choices=["episode", "causal"], help="a nested episode's replies "
        "get the whole return, or (causal, the default with the mean) their sub-game's part on")
    add("--opponent", default="random", help="other seats: TicTacToe's scripted player, random | "
        "expert | eps:P (random with probability P) | eps:P-Q (P drawn per game); or self (a "
        "frozen copy of the learner) | model:PATH, which play every other seat of every game")
    add("--episode-draws", action="store_true", help="scripted and random players draw per "
        "episode (default: per instance, the same for a group's episodes)")
    add("--self-refresh", type=int, default=10, help="with --opponent self: refresh every K steps")
    # How much
    add("--steps", type=int, default=None,
        help="GRPO steps (default: 250, or as many as --budget-turns takes)")
    add("--budget-turns", type=int, default=0,
        help="stop once the learner has played this many turns (0: run all --steps)")
    add("--instances", type=int, default=4, help="B: game instances (seeds) per step")
    add("--group-size", type=int, default=8, help="G: episodes per instance (at least 2)")
    # The update
    add("--lr", type=float, default=1e-4, help="AdamW learning rate")
    add("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up (0: none)")
    add("--beta", type=float, default=0.04, help="weight of the k3 KL to the start model (0: none)")
    add("--ref-reset", type=int, default=0, help="make the KL's reference the policy every K "
        "steps (ProRL's reset, the optimizer's state kept; 0: it stays the start model)")
    add("--eps-low", type=float, default=0.2, help="ratio clip below 1")
    add("--eps-high", type=float, default=0.28, help="ratio clip above 1")
    add("--minibatches", type=int, default=2, help="optimizer steps per rollout batch")
    add("--scale-rewards", default="group", choices=["group", "none"],
        help="divide advantages by the group std")
    add("--top-groups", type=float, default=1.0, help="keep this fraction of groups, by spread")
    add("--baseline", default="group", choices=["group", "running"], help="what a return is "
        "compared with: its group's mean, or the running mean of its role's returns (SPIRAL)")
    add("--entropy-coef", type=float, default=0.0,
        help="weight of an entropy bonus per learner token (0: none)")
    add("--max-new-tokens", type=int, default=24, help="cap on generated tokens per turn")
    add("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    # Where and how
    add("--eval-games", type=int, default=400,
        help="held-out games per game before and after (0: skip)")
    add("--seed", type=int, default=0, help="fixes the games, the sampling and the minibatch order "
        "(the tiny model's initial weights have their own fixed seed)")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="compute precision; "
        "weights and optimizer state stay float32 (auto: policy.auto_precision)")
    add("--thinking", action="store_true",
        help="let templates with a thinking switch (Qwen3) think (off: replies are short)")
    add("--train-layers", type=int, default=0, help="train only the top N decoder layers and the "
        "final norm (0: every weight): less compute and memory per step, at a cost to learning")
    add("--micro-batch-gb", type=float, default=3.0, help="activations per forward and backward: "
        "minibatches are split into pieces of about this many GB (same gradient)")
    add("--grad-checkpointing", action="store_true",
        help="recompute activations in backward: less memory for long nested conversations, slower")
    add("--run-dir", default=None, help="where metrics, transcripts and checkpoints go "
        "(default runs/<mode>-<games>-seed<seed>)")
    add("--save-every", type=int, default=10, help="checkpoint every N steps")
    add("--transcripts", type=int, default=2, help="learner transcripts saved per step")
    add("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 10 ** 9 if args.budget_turns else 250
    checks = [
        (args.group_size >= 2, "--group-size must be at least 2"),
        (min(args.steps, args.instances, args.minibatches, args.max_new_tokens) >= 1,
         "--steps, --instances, --minibatches and --max-new-tokens must be at least 1"),
        (min(args.seed, args.train_layers, args.warmup, args.ref_reset) >= 0,
         "--seed, --train-layers, --warmup and --ref-reset must be non-negative"),
        (args.beta > 0 or not args.ref_reset, "--ref-reset needs a KL penalty (--beta > 0)"),
        (args.micro_batch_gb > 0 and args.temperature > 0,
         "--micro-batch-gb and --temperature must be > 0"),
        (0 < args.top_groups <= 1, "--top-groups must be in (0, 1]"),
        (args.credit != "causal" or args.nested_reward == "mean",
         "--credit causal needs --nested-reward mean")]
    problems = [message for ok, message in checks if not ok]
    try:
        args.games = games.game_names(args.games)
        nested.check_opponent(args.opponent)
    except ValueError as error:
        problems.insert(0, str(error))
    if problems:
        p.exit(2, f"grpo.py: error: {problems[0]}\n")
    args.mode = "single" if len(args.games) == 1 else (args.mode or "nested")
    causal = args.mode == "nested" and args.nested_reward == "mean"
    args.credit = args.credit or ("causal" if causal else "episode")
    args.run_dir = Path(args.run_dir or f"runs/{args.mode}-{'-'.join(args.games)}-seed{args.seed}")
    return args


# ----------------------------------------------------------------- several processes (torchrun)
class Ranks:
    """This process's place among those `torchrun` started (its environment variables say), and the
    few collective operations the step needs; without torchrun: one process, each a no-op."""

    def __init__(self, timeout_s: float = 1800):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank, self.local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0
        self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            # A rank that dies makes the others' next collective fail after `timeout_s` rather than
            # hang (torchrun also stops the other ranks as soon as one exits with an error).
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local)
                self.device = torch.device(f"cuda:{self.local}")
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))

    def block(self, n: int) -> tuple[int, int]:
        """This rank's share of n items: the contiguous block first..last - 1."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def concat(self, items: list) -> list:
        """Every rank's `items`, concatenated in rank order, on every rank."""
        if self.world == 1:
            return list(items)
        out = [None] * self.world
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM) if self.world > 1 else list(values)

    def max(self, value: float) -> float:
        return self._reduce([value], dist.ReduceOp.MAX)[0] if self.world > 1 else value

    def _reduce(self, values, op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum_gradients(self, parameters):
        """Sum each gradient over the ranks (a rank without episodes in a minibatch adds zeros)."""
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
