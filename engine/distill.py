"""`tradeoff distill`: train the default model's draft (engine/draft.py) by self-distillation, on this CPU.

1. Data: the target's own replies (greedy, and sampled for every other prompt) to a few hundred chat
   prompts composed from templates and subjects below (questions, explanations, summaries and rewrites
   of given texts, lists, code, emails). Replies are cached in a JSONL file, so a rerun resumes.
   Held-out prompts use subjects that no training prompt mentions.
2. Targets: the fp32 target scores every prompt+reply sequence in prefill mode; its top-k next-token
   probabilities at each reply position are the soft labels.
3. Training: the draft's own layer and final norm (embedding and head are the target's, frozen)
   minimise the cross-entropy to those probabilities (KL up to a constant) with AdamW, seeded.
4. Held-out report: top-1 agreement with the target's greedy token, and the accepted length per
   target step for k drafted tokens, simulated exactly on the greedy replies (in greedy speculation
   the draft sees the target's own tokens, so teacher-forced agreement decides acceptance).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from engine.draft import DEFAULT_DRAFT_PATH, Draft, init_draft, load_draft, save_draft
from engine.engine import Engine, Request
from engine.kv_cache import StaticKVCache
from engine.loader import load
from engine.machine import machine
from engine.model import Transformer
from engine.registry import DEFAULT_MODEL
from engine.sampling import SamplingParams

SEED = 0
SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 0.7, 0.9  # the sampled replies: varied, still fluent

# ---- prompts --------------------------------------------------------------------------------------

TOPICS = [
    "photosynthesis", "black holes", "volcanoes", "the French Revolution", "machine learning", "vaccines",
    "recycling", "the water cycle", "inflation", "the Roman Empire", "climate change", "electric cars",
    "the human heart", "earthquakes", "the internet", "democracy", "honey bees", "the Moon landing",
    "renewable energy", "DNA", "the stock market", "coral reefs", "gravity", "the printing press",
    "sleep", "rainbows", "the immune system", "solar panels", "the Great Wall of China", "plate tectonics",
    "antibiotics", "compound interest", "the Olympic Games", "tides", "cloud computing", "dinosaurs",
    "the Renaissance", "nuclear power", "migration of birds", "the periodic table", "World War I",
    "supply and demand", "rain forests", "the speed of light", "coffee", "the Silk Road", "batteries",
    "jazz music", "glaciers", "the Pythagorean theorem",
]
ACTIVITIES = [
    "learning a new language", "staying focused while working", "saving money", "running a first marathon",
    "cooking healthy meals on a budget", "sleeping better", "preparing for a job interview", "keeping houseplants alive",
    "public speaking", "studying for exams", "starting a vegetable garden", "travelling on a budget",
    "writing a good essay", "reducing stress", "learning to play the guitar", "making new friends in a new city",
    "keeping a tidy home", "taking better photos with a phone", "training a puppy", "reading more books",
]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "counts the vowels in a sentence", "finds the largest number in a list", "removes duplicates from a list",
    "checks whether a word is a palindrome", "converts Celsius to Fahrenheit", "sorts a list of names by length",
    "computes the factorial of a number", "merges two sorted lists", "counts how often each word appears in a text",
    "returns the average of a list of numbers", "checks whether two strings are anagrams",
    "flattens a nested list", "finds the second smallest number in a list", "capitalises every word in a sentence",
    "computes the greatest common divisor of two numbers", "reads a file and counts its lines",
    "returns all even numbers from a list",
]
PASSAGES = [
    "The Industrial Revolution began in Britain in the late 18th century, when new machines, steam power and "
    "factories changed how goods were made. It spread to Europe and North America, raised output and living "
    "standards over time, and also brought crowded cities, child labour and pollution.",
    "Honey bees live in colonies of up to sixty thousand insects. A single queen lays the eggs, worker bees collect "
    "nectar and pollen, and drones mate with new queens. Bees pollinate many crops, so their decline worries farmers.",
    "Our team will move to the new office on the third floor next Monday. Please pack your desk by Friday afternoon "
    "and label every box with your name. The movers arrive at 8 am, and the network will be down until noon.",
    "The city council voted on Tuesday to turn the old railway line into a cycling and walking path. The project will "
    "cost four million dollars, take two years, and connect three parks. Some residents worry about noise and parking.",
    "Regular exercise strengthens the heart, improves mood and helps people sleep. Doctors recommend at least 150 "
    "minutes of moderate activity a week, such as brisk walking, cycling or swimming, plus some strength training.",
    "The smartphone combines a phone, a camera, a music player and a computer in one pocket-sized device. Since 2007 "
    "it has changed how people shop, navigate, take pictures and talk to each other, and it has raised concerns "
    "about screen time.",
    "Mount Everest is the highest mountain above sea level, at 8,849 metres. Climbers face thin air, extreme cold and "
    "sudden storms. Most expeditions use bottled oxygen and Sherpa guides, and many climbers turn back before the summit.",
    "Our online store now offers free delivery on orders over fifty dollars. Orders placed before 2 pm ship the same "
    "day. If you are not happy with an item, you can return it within thirty days for a full refund.",
    "The library will extend its opening hours during the exam period. From the first of May it will open at 7 am and "
    "close at midnight on weekdays. Quiet study rooms can be booked online for up to three hours at a time.",
    "Octopuses are clever animals with three hearts and blue blood. They can change colour in a fraction of a second, "
    "squeeze through tiny gaps, and solve simple puzzles. Most species live only one or two years.",
    "The first modern Olympic Games were held in Athens in 1896, with athletes from fourteen countries. Today the summer "
    "and winter games alternate every two years and bring together more than two hundred nations.",
    "Tea was first drunk in China thousands of years ago. Traders carried it along the Silk Road and by sea to Europe, "
    "where it became hugely popular in Britain. Today it is the most consumed drink in the world after water.",
    "A new study found that people who walk for thirty minutes a day are less likely to develop heart disease. The "
    "researchers followed ten thousand adults for ten years and adjusted for age, diet and smoking.",
    "The company reported record profits this quarter, driven by strong sales of its new laptop. However, the chief "
    "executive warned that rising chip prices and weaker demand in Europe could slow growth next year.",
]
PEOPLE = ["my manager", "a colleague", "my landlord", "a teacher", "a customer", "my neighbour", "a friend", "the team"]
EMAIL_SUBJECTS = [
    "asking for a day off", "a delayed delivery", "a broken heater", "thanking them for their help", "rescheduling a meeting",
    "a project update", "a noisy party", "an invitation to dinner", "a refund request", "starting a book club",
]

TEMPLATES: list[tuple[str, str]] = [  # (template, pool of the {x} slot)
    ("What is {x}?", "topic"), ("How does {x} work?", "topic"), ("Why is {x} important?", "topic"),
    ("Explain {x} to a ten-year-old.", "topic"), ("Explain {x} in three sentences.", "topic"),
    ("List five interesting facts about {x}.", "topic"), ("What are the advantages and disadvantages of {x}?", "topic"),
    ("Write a short paragraph about {x}.", "topic"), ("Write a haiku about {x}.", "topic"),
    ("Give me three questions for a quiz about {x}.", "topic"),
    ("Give me three tips for {x}.", "activity"), ("What are the most common mistakes people make when {x}?", "activity"),
    ("Write a step-by-step plan for {x}.", "activity"),
    ("Write a Python function that {x}.", "code"), ("Write a Python function that {x}, and explain how it works.", "code"),
    ("Write a JavaScript function that {x}.", "code"),
    ("Summarise the following text in two sentences.\n\n{x}", "passage"),
    ("Summarise this in one sentence: {x}", "passage"),
    ("Rewrite the following text in a more formal tone.\n\n{x}", "passage"),
    ("Rewrite this text so a child can understand it: {x}", "passage"),
    ("Turn the following text into a bulleted list of key points.\n\n{x}", "passage"),
    ("Suggest a title for this text: {x}", "passage"),
    ("Write three questions that this text answers.\n\n{x}", "passage"),
    ("Write a short, polite email to {x}.", "email"),
]
POOLS = {"topic": TOPICS, "activity": ACTIVITIES, "code": CODE_TASKS, "passage": PASSAGES,
         "email": [f"{p} about {s}" for p in PEOPLE for s in EMAIL_SUBJECTS]}


def is_held_out(pool: str, index: int) -> bool:
    """Every seventh subject of each pool (every fifth passage) is reserved for the held-out prompts."""
    return index % (5 if pool == "passage" else 7) == 3


def compose_prompts(n_train: int, n_held_out: int, seed: int = SEED) -> tuple[list[str], list[str]]:
    """Distinct prompts from every template x subject pair, shuffled; held-out ones share no subject with training."""
    train, held_out = [], []
    for template, pool in TEMPLATES:
        for i, x in enumerate(POOLS[pool]):
            (held_out if is_held_out(pool, i) else train).append(template.format(x=x))
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held_out)
    if n_train > len(train) or n_held_out > len(held_out):
        raise ValueError(f"at most {len(train)} training and {len(held_out)} held-out prompts can be composed")
    return train[:n_train], held_out[:n_held_out]


# ---- data -----------------------------------------------------------------------------------------

def generation_jobs(train: list[str], held_out: list[str]) -> list[dict]:
    """Held-out greedy replies first (the evaluation needs them), then training: greedy for every prompt,
    sampled for every other one, interleaved so a partial run is still a balanced data set."""
    jobs = [{"split": "held_out", "prompt": p, "mode": "greedy"} for p in held_out]
    for i, p in enumerate(train):
        jobs.append({"split": "train", "prompt": p, "mode": "greedy"})
        if i % 2 == 0:
            jobs.append({"split": "train", "prompt": p, "mode": "sampled", "seed": SEED + i})
    return jobs


def generate_data(path: Path, train: list[str], held_out: list[str], max_tokens: int) -> list[dict]:
    """The target's replies, one JSON line per (prompt, mode); lines already in `path` are kept and skipped."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["prompt"], rec["mode"])] = rec
    jobs = [j for j in generation_jobs(train, held_out) if (j["prompt"], j["mode"]) not in done]
    if jobs:
        engine = Engine()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f, tqdm(jobs, desc="target replies", unit="reply") as bar:
            n_tokens, t0 = 0, time.monotonic()
            for job in bar:
                if job["mode"] == "greedy":
                    sampling = SamplingParams(max_tokens=max_tokens)
                else:
                    sampling = SamplingParams(max_tokens=max_tokens, temperature=SAMPLE_TEMPERATURE,
                                              top_p=SAMPLE_TOP_P, seed=job["seed"])
                request = Request(messages=[{"role": "user", "content": job["prompt"]}], sampling=sampling)
                out = engine.generate(request)
                rec = {**job, "prompt_ids": engine.prompt_ids(request), "reply_ids": out.token_ids,
                       "finish_reason": out.finish_reason}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                done[(rec["prompt"], rec["mode"])] = rec
                n_tokens += len(out.token_ids)
                bar.set_postfix(tok_s=f"{n_tokens / (time.monotonic() - t0):.1f}")
        engine.close()
    return [done[(j["prompt"], j["mode"])] for j in generation_jobs(train, held_out)]


# ---- soft labels from the fp32 target -------------------------------------------------------------

class PackedCausalAttention:
    """Attention over several sequences packed into one flat batch: a token sees the earlier tokens of its own
    sequence. Used for training and scoring, where every sequence is processed whole (no KV cache)."""

    def __init__(self, lengths: list[int]):
        seq_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        self.mask = (seq_of[:, None] == seq_of[None, :]).tril()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(q.shape[2], -1)


@dataclass
class Batch:
    """Packed sequences: tokens and positions [T], and the rows whose next token is a reply token."""

    tokens: Tensor
    positions: Tensor
    lengths: list[int]
    reply_lengths: list[int]
    rows: Tensor  # [R] indices into T of the tokens whose next token is a reply token
    top_ids: Tensor | None = None  # [R, K] the target's K most likely next tokens at `rows`
    top_probs: Tensor | None = None  # [R, K] their probabilities


def pack(records: list[dict], batch_tokens: int) -> list[Batch]:
    """Group whole prompt+reply sequences into batches of about `batch_tokens` tokens, in order."""
    batches, group, size = [], [], 0
    for rec in records + [None]:
        n = None if rec is None else len(rec["prompt_ids"]) + len(rec["reply_ids"])
        if group and (rec is None or size + n > batch_tokens):
            ids = [r["prompt_ids"] + r["reply_ids"] for r in group]
            starts = torch.tensor([0] + [len(s) for s in ids]).cumsum(0)
            rows = [torch.arange(start + len(r["prompt_ids"]) - 1, start + len(s) - 1)
                    for r, s, start in zip(group, ids, starts.tolist())]
            batches.append(Batch(torch.tensor([t for s in ids for t in s]), torch.cat([torch.arange(len(s)) for s in ids]),
                                 [len(s) for s in ids], [len(r["reply_ids"]) for r in group], torch.cat(rows)))
            group, size = [], 0
        if rec is not None:
            group.append(rec)
            size += n
    return batches


def forward_hidden(model: Transformer, batch: Batch) -> Tensor:
    """Final hidden states [T, dim] of a packed batch. `Transformer.forward` runs under inference_mode, so this
    calls the function it wraps: gradients flow when the model has trainable parameters."""
    return Transformer.forward.__wrapped__(model, batch.tokens, batch.positions, PackedCausalAttention(batch.lengths))


def label(target: Transformer, batches: list[Batch], top_k: int) -> None:
    """Fill every batch's top-k next-token probabilities from the target (full-vocabulary softmax)."""
    for batch in tqdm(batches, desc="target soft labels", unit="batch"):
        with torch.inference_mode():
            hidden = forward_hidden(target, batch)[batch.rows]
            top_probs, top_ids = torch.softmax(target.logits(hidden), dim=-1).topk(top_k, dim=-1)
        batch.top_probs, batch.top_ids = top_probs.clone(), top_ids.clone()  # normal tensors: training reads them


# ---- training -------------------------------------------------------------------------------------

def vocab_subset(records: list[dict], n: int, vocab_size: int) -> Tensor:
    """The n tokens the target emitted most often in `records`; ties and unseen tokens go by id (BPE merge order,
    roughly the tokenizer corpus's frequency order). Sorted by id."""
    counts = torch.bincount(torch.tensor([t for r in records for t in r["reply_ids"]]), minlength=vocab_size)
    order = torch.argsort(-counts.double() + torch.arange(vocab_size) / vocab_size)  # count desc, then id asc
    return order[:n].sort().values


def soft_cross_entropy(draft: Draft, hidden: Tensor, batch: Batch, slot: Tensor) -> Tensor:
    """-sum_k p_k log q(id_k) over the target's top-k tokens that the draft's head covers (KL up to a constant)."""
    logq = torch.log_softmax(F.linear(hidden, draft.lm_head).float(), dim=-1)
    index = slot[batch.top_ids]  # position of each top-k token in the draft's head, -1 if not covered
    covered = index >= 0
    picked = logq.gather(-1, index.clamp(min=0))
    return -(batch.top_probs * picked * covered).sum(-1).mean()


def train(draft: Draft, batches: list[Batch], epochs: int, lr: float, seed: int) -> list[float]:
    """AdamW on the draft's own layers and final norm, cosine learning rate after a short warm-up. Returns epoch losses."""
    torch.manual_seed(seed)
    params = [*draft.layers.parameters(), draft.norm]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    total = epochs * len(batches)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    slot = torch.full((draft.cfg.vocab_size,), -1, dtype=torch.long)
    slot[draft.vocab_ids] = torch.arange(len(draft.vocab_ids))
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(batches)).tolist()
        bar = tqdm(order, desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        total_loss = 0.0
        for i, b in enumerate(bar):
            batch = batches[b]
            loss = soft_cross_entropy(draft, forward_hidden(draft, batch)[batch.rows], batch, slot)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total_loss += loss.item()
            bar.set_postfix(loss=f"{total_loss / (i + 1):.3f}")
        losses.append(total_loss / len(batches))
    for p in params:
        p.requires_grad_(False)
    return losses


# ---- evaluation -----------------------------------------------------------------------------------

@torch.inference_mode()
def agreement(draft: Draft, batches: list[Batch]) -> list[Tensor]:
    """Per greedy reply, a bool per reply token: is it the draft's top token? (The reply is the target's greedy choice.)"""
    per_reply = []
    for batch in batches:
        hidden = forward_hidden(draft, batch)[batch.rows]
        guess = draft.vocab_ids[F.linear(hidden, draft.lm_head).argmax(-1)]
        per_reply += (guess == batch.tokens[batch.rows + 1]).split(batch.reply_lengths)
    return per_reply


def tokens_per_step(match: Tensor, k: int) -> tuple[int, int]:
    """Greedy speculation with k drafted tokens over one reply: (tokens emitted, target forwards). Each step
    accepts the leading drafts that match and then takes the target's own token (correction or bonus)."""
    t, steps = 0, 0
    while t < len(match):
        window = match[t : t + k].tolist()
        accepted = window.index(False) if False in window else len(window)
        t += accepted + 1
        steps += 1
    return len(match), steps


@torch.inference_mode()
def step_ms(model: Transformer, steps: int = 40) -> float:
    """Median ms of one batch-1 decode step (forward + logits + argmax) after a 64-token prefill."""
    cache = StaticKVCache(model.cfg, 64 + steps, model.dtype, model.device)
    model.logits(model(torch.arange(64), cache.begin(64), cache)[-1:])
    token, times = torch.tensor([100]), []
    for _ in range(steps):
        t = time.perf_counter()
        token = model.logits(model(token, cache.begin(1), cache)).argmax(-1)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


# ---- the whole recipe -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    t_start = time.monotonic()
    train_prompts, held_prompts = compose_prompts(args.train_prompts, args.held_out_prompts)
    records = generate_data(Path(args.data), train_prompts, held_prompts, args.max_tokens)
    t_data = time.monotonic() - t_start
    train_recs = [r for r in records if r["split"] == "train"]
    held_recs = [r for r in records if r["split"] == "held_out"]

    loaded = load(DEFAULT_MODEL)
    target = Transformer(loaded.config, torch.float32)  # fp32: exact soft labels, and fast prefill on this CPU
    target.load_canonical(loaded.weights)
    torch.manual_seed(args.seed)
    train_batches = pack(train_recs, args.batch_tokens)
    label(target, train_batches, args.top_k)
    held_batches = pack(held_recs, args.batch_tokens)
    vocab_ids = vocab_subset(train_recs, args.vocab, loaded.config.vocab_size)
    held_tokens = torch.tensor([t for r in held_recs for t in r["reply_ids"]])
    coverage = torch.isin(held_tokens, vocab_ids).float().mean().item()

    layers = tuple(int(x) for x in args.layers.split(","))
    draft = init_draft(target, layers, vocab_ids)
    untrained = torch.cat(agreement(draft, held_batches)).float().mean().item()
    t_train = time.monotonic()
    losses = train(draft, train_batches, args.epochs, args.lr, args.seed)
    t_train = time.monotonic() - t_train

    n_train_tokens = sum(len(r["reply_ids"]) for r in train_recs)
    facts = {"target": DEFAULT_MODEL, "seed": args.seed, "epochs": args.epochs, "lr": args.lr, "top_k": args.top_k,
             "batch_tokens": args.batch_tokens, "train_prompts": args.train_prompts, "train_replies": len(train_recs),
             "train_reply_tokens": n_train_tokens, "held_out_replies": len(held_recs),
             "held_out_reply_tokens": len(held_tokens), "epoch_losses": [round(x, 4) for x in losses],
             "train_seconds": round(t_train), "date": time.strftime("%Y-%m-%d")}
    out = save_draft(draft, args.out, layers, facts)
    draft = load_draft(target, out)  # measure the weights as written (fp16)
    matches = agreement(draft, held_batches)
    agree = torch.cat(matches).float().mean().item()
    rows = []
    for k in range(1, 7):
        emitted, steps = map(sum, zip(*(tokens_per_step(m, k) for m in matches)))
        rows.append({"k": k, "tokens_per_target_forward": emitted / steps, "accepted_per_step": emitted / steps - 1,
                     "iid_accepted_per_step": sum(agree**i for i in range(1, k + 1))})
    k4 = rows[3]
    facts |= {"held_out_agreement": round(agree, 4), "untrained_agreement": round(untrained, 4),
              "held_out_vocab_coverage": round(coverage, 4), "k4_accepted_per_step": round(k4["accepted_per_step"], 3),
              "k4_tokens_per_target_forward": round(k4["tokens_per_target_forward"], 3)}
    save_draft(draft, out, layers, facts)

    # Whether the vocabulary subset pays: one decode step of the bf16 target, the draft, and the draft with a full head.
    target16 = Transformer(loaded.config, torch.bfloat16)
    target16.load_canonical(loaded.weights)
    speed = {"target_step_ms": step_ms(target16), "draft_step_ms": step_ms(load_draft(target16, out)),
             "full_head_draft_step_ms": step_ms(init_draft(target16, layers, torch.arange(loaded.config.vocab_size)))}
    return {"facts": facts, "rows": rows, "speed": speed, "out": str(out), "data_seconds": t_data,
            "total_seconds": time.monotonic() - t_start, "file_bytes": out.stat().st_size}


COLUMNS = [("k", "k", "d"), ("tokens_per_target_forward", "tokens/target fwd", ".2f"),
           ("accepted_per_step", "accepted/step", ".2f"), ("iid_accepted_per_step", "iid estimate", ".2f")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="bench/out/distill_data.jsonl",
                   help="reply cache; a rerun resumes it (default: %(default)s)")
    p.add_argument("--out", default=str(DEFAULT_DRAFT_PATH), help="where to write the draft (default: %(default)s)")
    p.add_argument("--train-prompts", type=int, default=240, help="training prompts (default: %(default)s)")
    p.add_argument("--held-out-prompts", type=int, default=40, help="held-out prompts, unseen subjects (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="longest reply (default: %(default)s)")
    p.add_argument("--layers", default="0", help="target layers the draft's layers start from (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=8192, help="tokens the draft's head covers (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=32, help="target probabilities kept per position (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=6, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=512, help="tokens per packed batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--json", default="bench/out/distill.json", help="where to write the JSON (default: %(default)s)")


def configure(name: str, p: argparse.ArgumentParser, argv: list[str]) -> None:
    """Fill in the parser of `tradeoff distill`."""
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    f, s = result["facts"], result["speed"]
    print("  ".join(header for _, header, _ in COLUMNS))
    for row in result["rows"]:
        print("  ".join(format(row[key], spec).rjust(len(header)) for key, header, spec in COLUMNS))
    print(f"draft: {result['out']} ({result['file_bytes'] / 1e6:.1f} MB), layers from target {args.layers}, "
          f"head {args.vocab} tokens")
    print(f"data: {f['train_replies']} training replies ({f['train_reply_tokens']} tokens), {f['held_out_replies']} held-out; "
          f"{result['data_seconds'] / 60:.1f} min generating, {f['train_seconds'] / 60:.1f} min training, "
          f"{result['total_seconds'] / 60:.1f} min in all")
    print(f"held-out top-1 agreement with the target's greedy token: {f['held_out_agreement']:.3f} "
          f"(untrained init {f['untrained_agreement']:.3f}; the head covers {f['held_out_vocab_coverage']:.3f} of the tokens)")
    print(f"decode step ms (bf16): target {s['target_step_ms']:.1f}, draft {s['draft_step_ms']:.2f}, "
          f"draft with the full head {s['full_head_draft_step_ms']:.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "distill", "machine": machine(), "rows": result["rows"], "facts": f,
                               "speed": s}, indent=2))
    print(f"JSON: {out}")
    return 0
