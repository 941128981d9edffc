"""Tasks turn rows into token batches, a scalar objective for ZO, and eval metrics.

Only the logits a loss needs are computed: classification takes the final hidden state at the
last real token and multiplies it by the verbalizer rows of the output embedding (a [batch, labels]
matrix, never [batch, seq, vocab]); generation takes hidden states at answer positions only.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgezo.data import DataError
from edgezo.models import decoder_of, head_weight
from edgezo.perturb import Perturber
from edgezo.prefix import FeatureCache, PrefixCache


@dataclass
class Example:
    ids: list[int]
    label: int = -1  # classification: index into the verbalizer
    answer_start: int = -1  # generation: first answer token position in ids
    answer: str = ""


def _render(template: str, row: dict, where: str) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise DataError(f"task.template: uses {{{e.args[0]}}} but {where} has no such column "
                        f"(columns: {', '.join(sorted(row))})") from None
    except (IndexError, ValueError) as e:
        raise DataError(f"task.template: cannot be filled: {e}") from None


def _pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def length_batches(examples: list[Example], batch_size: int) -> list[list[int]]:
    """Evaluation batches of similar-length examples (order does not change a metric; padding costs)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Task:
    """Shared plumbing: the model, its tokenizer, and the perturber the ZO method drives."""

    def __init__(self, cfg: dict, model: nn.Module, tokenizer, perturber: Perturber, max_length: int,
                 device: torch.device):
        self.cfg, self.model, self.tok, self.perturber = cfg, model, tokenizer, perturber
        self.max_length, self.device = max_length, device
        self.decoder = decoder_of(model)
        self.head = head_weight(model)
        self.prefix: PrefixCache | None = None  # set by the trainer when the bottom of the net is frozen
        self.features: FeatureCache | None = None  # set by the trainer when no block trains (top0)
        self._capture_next = False
        self.recalled = False  # the last captured batch came from the feature cache: no forward ran

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, batch: list[Example] | None = None) -> torch.Tensor:
        """The final hidden states; `batch` (training examples) lets a step reuse their kept features."""
        pc = self.prefix
        if pc is not None and self._capture_next:
            self._capture_next = False
            fc, last = self.features, mask.sum(1) - 1
            self.recalled = fc is not None and batch is not None and fc.has(batch)
            if self.recalled:
                pc.kept, pc.key = fc.recall(batch, (*ids.shape, self.decoder.config.hidden_size), last), ids.clone()
                return self._on_kept(ids, mask)
            with pc.capturing(ids):
                out = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            if fc is not None and batch is not None and isinstance(pc.kept, torch.Tensor):
                fc.remember(batch, pc.kept, last)
            return out
        if pc is not None and pc.holds(ids):
            return self._on_kept(ids, mask)
        return self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def _on_kept(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The final hidden states from the prefix cache's kept output: the final norm alone when no
        block trains, else the decoder with its frozen blocks answering from the cache."""
        pc = self.prefix
        if pc.top is not None:
            return pc.top(pc.kept)
        with pc.replaying():
            return self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def warm_features(self, batch: list[Example]) -> None:
        """Compute and keep the features of a batch's new examples, exactly as a step on it would."""
        if self.features is None or self.prefix is None or self.features.has(batch):
            return
        self.prefix.clear()
        self._capture_next = True
        with self.perturber.inactive():
            self.objective(batch)
        self.prefix.clear()

    def step_objective(self, batch: list[Example]) -> StepObjective:
        return StepObjective(self, batch)

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tok(text)["input_ids"]
        return ids[-self.max_length :]


class StepObjective:
    """The ZO objective on one step's batch: `base()` is the unperturbed value, calling it gives the
    value under whatever perturbation is active. With a prefix cache the frozen bottom of the network
    runs once (in `base()`, forced before the first perturbed call) and every call after reuses it."""

    def __init__(self, task: Task, batch: list[Example]):
        self.task, self.batch = task, batch
        self._base: float | None = None
        self._base_out: torch.Tensor | None = None
        self.forwards = 0  # full forwards spent (prefix shared: 1, however many directions)
        self.short = 0  # forwards of the trainable top only

    def base(self) -> float:
        if self._base is None:
            t = self.task
            with t.perturber.inactive():
                if t.prefix is not None:
                    t.prefix.clear()
                    t._capture_next = True
                self._base = t.objective(self.batch)
            self.forwards += 0 if t.recalled else 1  # recalled features: only the norm and the head ran
        return self._base

    def __call__(self) -> float:
        if self.task.prefix is not None:
            self.base()
            self.short += 1
        else:
            self.forwards += 1
        return self.task.objective(self.batch)

    def outputs(self, base: bool = False) -> torch.Tensor:
        """The outputs the loss reads (classification: the [batch, labels] verbalizer logits), under the
        active perturbation or, with `base`, unperturbed (asked first, that forward is also the one
        base() answers from); counted as base() and calls are. PseuZO differentiates the loss in them."""
        t = self.task
        if base:
            if self._base_out is None:
                fresh = self._base is None
                with t.perturber.inactive():
                    if fresh and t.prefix is not None:
                        t.prefix.clear()
                        t._capture_next = True
                    self._base_out = t.logits(self.batch)
                if fresh:
                    self._base = t.objective_of(self._base_out, self.batch)
                    self.forwards += 0 if t.recalled else 1
                elif t.prefix is not None:
                    self.short += 1
                else:
                    self.forwards += 1
            return self._base_out
        if t.prefix is not None:
            self.outputs(base=True)
            self.short += 1
        else:
            self.forwards += 1
        return t.logits(self.batch)

    def loss(self) -> torch.Tensor:
        """The differentiable loss, for method: fo. Counted as 4 forwards: the forward, its
        recomputation under activation checkpointing, and a backward of about two forwards."""
        self.forwards += 4
        return self.task.loss(self.batch)

    def cost(self) -> float:
        """What the step spent, in full-forward equivalents (a short forward runs a fraction of the blocks)."""
        pc = self.task.prefix
        return self.forwards + (self.short * (1.0 - pc.cut / pc.blocks) if pc is not None else 0.0)

    def done(self) -> None:
        if self.task.prefix is not None:
            self.task.prefix.clear()


class Classification(Task):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels = list(self.cfg["labels"])
        verb_ids = []
        for value, word in self.cfg["labels"].items():
            ids = self.tok(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise DataError(f"task.labels.{value}: verbalizer {word!r} is {len(ids)} tokens for this "
                                "tokenizer; it must be exactly one (try a leading space, e.g. ' positive')")
            verb_ids.append(ids[0])
        if len(set(verb_ids)) != len(verb_ids):
            raise DataError("task.labels: two labels map to the same token")
        self.verb_ids = torch.tensor(verb_ids, device=self.device)

    def encode(self, rows: list[dict], where: str) -> list[Example]:
        out = []
        field = self.cfg["label_field"]
        for i, row in enumerate(rows):
            if field not in row:
                raise DataError(f"task.label_field: row {i} of {where} has no column '{field}'")
            value = str(row[field])
            if value not in self.cfg["labels"]:
                raise DataError(f"task.labels: row {i} of {where} has label {value!r}, which task.labels does not map "
                                f"(known: {', '.join(self.labels)})")
            out.append(Example(ids=self.encode_prompt(_render(self.cfg["template"], row, where)),
                               label=self.labels.index(value)))
        return out

    def logits(self, batch: list[Example]) -> torch.Tensor:
        ids, mask = _pad([e.ids for e in batch], self.tok.pad_token_id, self.device)
        h = self.hidden(ids, mask, batch)
        last = mask.sum(1) - 1
        h_last = h[torch.arange(h.shape[0], device=h.device), last]
        rows = self.perturber.rows(self.head, self.verb_ids)
        return h_last.float() @ rows.float().T

    def loss(self, batch: list[Example]) -> torch.Tensor:
        """Differentiable cross-entropy over the verbalizer (DiZO's first-order projection uses it)."""
        logits = self.logits(batch)
        return F.cross_entropy(logits, torch.tensor([e.label for e in batch], device=logits.device))

    def objective(self, batch: list[Example]) -> float:
        return self.objective_of(self.logits(batch), batch)

    def objective_of(self, logits: torch.Tensor, batch: list[Example]) -> float:
        """The objective from a batch's logits (the same arithmetic as loss() for objective: loss)."""
        target = torch.tensor([e.label for e in batch], device=logits.device)
        if self.cfg["objective"] == "accuracy":
            return -float((logits.argmax(1) == target).float().mean())
        return float(F.cross_entropy(logits, target))

    @torch.no_grad()
    def evaluate(self, examples: list[Example], batch_size: int, kept: bool = False) -> dict:
        """Accuracy and loss. `kept`: the examples' features go into (or come from) the feature cache,
        for sentences scored again and again on a frozen network (the guard's held-out checks, top0)."""
        hits = [False] * len(examples)
        loss_sum = 0.0
        keep = kept and self.features is not None and self.prefix is not None
        for idx in length_batches(examples, batch_size):
            batch = [examples[i] for i in idx]
            if keep:  # the next forward captures the kept output, or recalls it when every example has one
                self.prefix.clear()
                self._capture_next = True
            logits = self.logits(batch)
            target = torch.tensor([e.label for e in batch], device=logits.device)
            for i, h in zip(idx, (logits.argmax(1) == target).tolist()):
                hits[i] = bool(h)
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        if keep:
            self.prefix.clear()
        n = max(1, len(examples))
        # per-sentence hits: what a paired interval for "final vs zero-shot" needs (edgezo/report.py)
        return {"accuracy": sum(hits) / n, "loss": loss_sum / n, "n": len(examples),
                "correct": "".join("1" if h else "0" for h in hits)}


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


class Generation(Task):
    def encode(self, rows: list[dict], where: str) -> list[Example]:
        out = []
        field = self.cfg["answer_field"]
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        for i, row in enumerate(rows):
            if field not in row:
                raise DataError(f"task.answer_field: row {i} of {where} has no column '{field}'")
            prompt = self.encode_prompt(_render(self.cfg["template"], row, where))
            answer = str(row[field])
            ans_ids = self.tok(" " + answer.strip(), add_special_tokens=False)["input_ids"] + eos
            ans_ids = ans_ids[: max(1, self.max_length // 2)]
            prompt = prompt[-(self.max_length - len(ans_ids)) :]
            out.append(Example(ids=prompt + ans_ids, answer_start=len(prompt), answer=answer))
        return out

    def loss(self, batch: list[Example]) -> torch.Tensor:
        ids, mask = _pad([e.ids for e in batch], self.tok.pad_token_id, self.device)
        h = self.hidden(ids, mask)
        rows, cols, targets = [], [], []
        for b, e in enumerate(batch):
            for t in range(e.answer_start, len(e.ids)):
                rows.append(b)
                cols.append(t - 1)
                targets.append(e.ids[t])
        h_ans = h[torch.tensor(rows, device=h.device), torch.tensor(cols, device=h.device)]
        w = self.perturber.full(self.head)
        logits = h_ans.float() @ w.float().T
        return F.cross_entropy(logits, torch.tensor(targets, device=logits.device))

    def objective(self, batch: list[Example]) -> float:
        if self.cfg["objective"] == "f1":
            preds = self.generate(batch)
            return -sum(f1_score(p, e.answer) for p, e in zip(preds, batch)) / len(batch)
        return float(self.loss(batch))

    def generate(self, batch: list[Example]) -> list[str]:
        prompts = [e.ids[: e.answer_start] for e in batch]
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding for generation
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        max_new = max(len(e.ids) - e.answer_start for e in batch) + 2
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=min(max_new, 64), do_sample=False, pad_token_id=pad)
        return [self.tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]

    @torch.no_grad()
    def evaluate(self, examples: list[Example], batch_size: int, kept: bool = False) -> dict:
        em = f1 = loss = 0.0
        for idx in length_batches(examples, batch_size):
            batch = [examples[i] for i in idx]
            loss += float(self.loss(batch)) * len(batch)
            for pred, e in zip(self.generate(batch), batch):
                em += float(normalize_answer(pred) == normalize_answer(e.answer))
                f1 += f1_score(pred, e.answer)
        n = max(1, len(examples))
        return {"exact_match": em / n, "f1": f1 / n, "loss": loss / n, "n": len(examples)}


def make_task(cfg: dict, *args, **kwargs) -> Task:
    return (Classification if cfg["type"] == "classification" else Generation)(cfg, *args, **kwargs)
