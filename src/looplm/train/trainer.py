"""The trainer: a recipe → a trained looplm dir, on accelerate, so the same code runs on this CPU and,
unchanged, under `accelerate launch` / `torchrun` with DDP (or FSDP, through accelerate's config).

    setup(recipe)  → tokenizer, model, data source, evaluator
    fit(recipe)    → for each phase: for each step: draw R → forward (LoopObjective) → backward → step
                     logs (log.jsonl + progress bar), evaluations, checkpoints (looplm.train.state)

Every batch and every loop count is a function of (seed, step) and the RNG is checkpointed, so a
resumed run repeats the uninterrupted one exactly. Each process takes rows rank, rank + world, ... of
the global batch; its loss is scaled by its share of the predicted tokens, so the all-reduced gradient
is that of the mean over the global batch, the same as one process on the whole batch.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import losses
from ..checkpoint import CheckpointError, load, load_tokenizer, save
from ..config import LoopConfig
from ..model import LoopedLM
from ..outputs import check_output, is_training_dir
from . import state as ckpt
from . import synthetic
from .data import SyntheticSource, TextSource, answer_starts, encode_problem
from .objective import LoopObjective, decode_like_logits
from .recipe import PhaseConfig, Recipe

log = logging.getLogger("looplm.train")


@dataclass
class FitResult:
    output_dir: Path
    model_dir: Path
    steps: int
    seconds: float
    last_log: dict[str, Any]
    last_eval: dict[str, Any] | None


# --------------------------------------------------------------------------- setup


def build_tokenizer(recipe: Recipe):
    if recipe.tokenizer == "synthetic":
        return synthetic.build_tokenizer()
    try:
        if recipe.tokenizer == "default":  # SmolLM2's (the Ouro tokenizer), from the default model
            from ..checkpoint import default_model_dir

            return load_tokenizer(default_model_dir())
        return load_tokenizer(recipe.tokenizer)
    except CheckpointError as e:
        raise ValueError(f"tokenizer: {e}") from None


def build_model(recipe: Recipe, tokenizer) -> LoopedLM:
    if recipe.init_from:
        return load(recipe.init_from).train()
    fields = dict(recipe.model)
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return LoopedLM(LoopConfig(**fields))


def build_source(recipe: Recipe, tokenizer, phase: PhaseConfig | None = None):
    d = recipe.data
    if d.kind == "synthetic":
        diffs = phase.difficulties if phase is not None and phase.difficulties else d.difficulties
        return SyntheticSource(tokenizer, task=d.task, difficulties=diffs, seq_len=d.seq_len, seed=recipe.seed,
                               **d.format_options())
    if phase is not None and phase.difficulties:
        raise ValueError(f"phase {phase.name!r}: difficulties apply to synthetic data only (data.kind={d.kind!r})")
    split = "train" if d.val_fraction and not d.val_paths else "all"
    return TextSource(tokenizer, paths=d.paths, seq_len=d.seq_len, seed=recipe.seed, text_field=d.text_field,
                      split=split, val_fraction=d.val_fraction)


def loops_for_step(recipe: Recipe, step: int) -> tuple[int, int]:
    """(R, no_grad_loops) of a step: drawn from a generator seeded by (seed, step) — every process agrees."""
    lc = recipe.loops
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
    if lc.sampling == "fixed":
        R = lc.num_loops
    elif lc.sampling == "uniform":
        R = losses.sample_num_loops(g, kind="uniform", low=lc.low, high=lc.high)
    else:
        R = losses.sample_num_loops(g, kind="poisson_lognormal", mean=lc.num_loops, sigma=lc.sigma, low=lc.low, high=lc.high)
    no_grad = 0 if lc.backprop_loops is None else max(0, R - lc.backprop_loops)
    return R, no_grad


def student_for_step(recipe: Recipe, step: int, R: int) -> int | None:
    """The loop the deepest loop teaches this step (self-distillation), uniform on 1..R−1."""
    if R < 2:
        return None
    g = torch.Generator().manual_seed(recipe.seed * 7_000_003 + step)
    return int(torch.randint(1, R, (1,), generator=g))


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_synthetic(model: LoopedLM, tokenizer, recipe: Recipe, *, count: int, max_loops: int) -> dict[str, Any]:
    """Held-out accuracy (the share of a problem's answers right, teacher-forced argmax) per loop count and
    difficulty."""
    d = recipe.data
    probs = synthetic.problems(d.task, seed=recipe.seed + 1, count=count, difficulties=d.difficulties,
                               split="heldout", **d.format_options())
    enc = [encode_problem(tokenizer, p) for p in probs]
    L = max(len(x) for x, _ in enc)
    ids = torch.full((len(enc), L), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, losses.IGNORE_INDEX)
    for i, (x, y) in enumerate(enc):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    was_training = model.training
    model.eval()
    out = model(ids.to(model.device), num_loops=max_loops, return_loops=True)
    starts = [answer_starts(y) for _, y in enc]
    last = None
    if any(len(t) > 1 for t in starts):  # answers after the first are decoded: score them under kv="last" too
        decode_from = torch.tensor([t[0] + 1 for t in starts])
        lengths = torch.tensor([len(x) for x, _ in enc])
        last = decode_like_logits(model, ids.to(model.device), decode_from, max_loops, lengths)
    model.train(was_training)
    labels = labels.to(model.device)
    answer = (labels != losses.IGNORE_INDEX) & (labels != tokenizer.eos_token_id)
    hit = (out.loop_logits.argmax(-1) == labels[None]) & answer[None]  # (R, N, S)
    right = hit.sum(-1).float() / answer.sum(-1).clamp(min=1)  # (R, N): share of the answers right
    diff = torch.tensor([p.difficulty for p in probs], device=right.device)
    acc = {f"acc@{r + 1}": round(right[r].mean().item(), 4) for r in range(max_loops)}
    by_diff = {str(k): [round(right[r][diff == k].mean().item(), 4) for r in range(max_loops)]
               for k in d.difficulties}
    result = {**acc, "acc_by_difficulty": by_diff}
    if last is not None:
        right = ((last.argmax(-1) == labels) & answer).sum(-1).float() / answer.sum(-1).clamp(min=1)  # (N,)
        result["acc_last_kv"] = round(right.mean().item(), 4)
        result["acc_last_kv_by_difficulty"] = {str(k): round(right[diff == k].mean().item(), 4) for k in d.difficulties}
    if out.exit_pdf is not None:
        pdf = out.exit_pdf[answer]  # (N_answer_tokens, R)
        result["exit_pdf"] = [round(v, 4) for v in pdf.mean(0).tolist()]
        result["mean_loops"] = round(float((pdf * torch.arange(1, max_loops + 1, device=pdf.device)).sum(-1).mean()), 4)
    return result


@torch.no_grad()
def evaluate_text(model: LoopedLM, source: TextSource, *, max_loops: int, batches: int = 4, batch_size: int = 8) -> dict:
    """Held-out per-loop NLL (nats/token) on blocks of the validation text."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(max_loops)
    for i in range(batches):
        b = source.batch(i, batch_size)
        out = model(b.input_ids.to(model.device), num_loops=max_loops, return_loops=True)
        ce = losses.per_loop_ce(out.loop_logits, b.labels.to(model.device))
        totals += ce.mean((1, 2)).cpu()
    model.train(was_training)
    return {f"nll@{r + 1}": round(float(totals[r] / batches), 4) for r in range(max_loops)}


# --------------------------------------------------------------------------- fit


def _optimizer(model: LoopedLM, phase: PhaseConfig, recipe: Recipe) -> torch.optim.Optimizer:
    gate_only = phase.trainable == "gate"
    if gate_only and model.early_exit_gate is None:
        raise ValueError(f"phase {phase.name!r}: trainable='gate' but the model has no exit gate")
    for name, p in model.named_parameters():
        p.requires_grad_(not gate_only or name.startswith("early_exit_gate."))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=phase.lr, betas=tuple(recipe.train.betas))


def _schedule(optimizer, phase: PhaseConfig):
    """Linear warmup, then cosine decay to lr × min_lr_ratio (a LambdaLR: its state is checkpointed)."""

    def factor(step: int) -> float:
        if step < phase.warmup_steps:
            return (step + 1) / phase.warmup_steps
        t = (step - phase.warmup_steps) / max(1, phase.steps - phase.warmup_steps)
        return phase.min_lr_ratio + (1 - phase.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(recipe: Recipe, *, resume: bool = True, progress: bool = True, max_steps: int | None = None,
        cpu: bool | None = None, overwrite: bool = False) -> FitResult:
    """Train the recipe; resume from the newest checkpoint of output_dir that reads back (and resume).

    max_steps: stop after this global step (≥ 1; for tests and for splitting a run); checkpoints are kept.
    output_dir must be absent, empty or a looplm training dir (`looplm.outputs.is_training_dir`: what this
    trainer writes, nothing of yours); anything else is refused before anything runs unless overwrite
    (then looplm writes into it and replaces a file at that path or a model/ in it).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be ≥ 1, got {max_steps} (no step would write an untrained model)")
    out_dir = check_output(recipe.output_dir, ours=is_training_dir, what="a looplm training dir (output_dir)",
                           overwrite=overwrite)
    tc = recipe.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    accel = Accelerator(cpu=cpu if cpu is not None else not torch.cuda.is_available(),
                        mixed_precision=tc.mixed_precision,
                        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    world, rank = accel.num_processes, accel.process_index
    if tc.batch_size % (world * tc.grad_accum):
        raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by {world} processes × "
                         f"grad_accum={tc.grad_accum}")
    fingerprint = recipe.fingerprint()
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    base_source = build_source(recipe, tokenizer)  # built (text: tokenized) once; validates the data up front
    val_source = None
    d = recipe.data
    if d.kind == "text" and d.val_paths:
        val_source = TextSource(tokenizer, paths=d.val_paths, seq_len=d.seq_len, seed=recipe.seed + 1,
                                text_field=d.text_field)
    elif d.kind == "text" and d.val_fraction:
        val_source = TextSource(tokenizer, paths=d.paths, seq_len=d.seq_len, seed=recipe.seed + 1,
                                text_field=d.text_field, split="val", val_fraction=d.val_fraction)
    max_loops = recipe.loops.num_loops if recipe.loops.sampling == "fixed" else recipe.loops.high

    start_step, restored = 0, None
    found = _resume(out_dir, fingerprint, set_aside=accel.is_main_process) if resume else None
    if found is not None:
        model, state, rng, optim_state = found
        model.train()
        torch.set_rng_state(rng["torch_rng"])
        start_step, restored = state["step"], (state, optim_state)
    elif not resume and accel.is_main_process:
        for old in ckpt.list_checkpoints(out_dir):
            shutil.rmtree(old)
        if (out_dir / "log.jsonl").exists():
            (out_dir / "log.jsonl").unlink()
    total = recipe.total_steps if max_steps is None else min(max_steps, recipe.total_steps)
    if accel.is_main_process:
        if overwrite and (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
            out_dir.unlink()  # --overwrite: a file where the output dir goes
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.json").write_text(json.dumps({**recipe.to_dict(), "fingerprint": fingerprint}, indent=1))
    log_file = out_dir / "log.jsonl"
    if start_step and accel.is_main_process and log_file.is_file():  # drop what the interrupted run logged later
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        log_file.write_text("".join(line + "\n" for line in kept))

    bar = tqdm(total=total, initial=start_step, disable=not (progress and accel.is_main_process), desc=recipe.name,
               dynamic_ncols=True)
    t_start, last_log, last_eval = time.perf_counter(), {}, None
    tokens_seen, t_window = 0, time.perf_counter()
    step = start_step
    phase_begin = 0
    for phase_idx, phase in enumerate(recipe.phases):
        phase_end = phase_begin + phase.steps
        if step >= phase_end or step >= total:
            phase_begin = phase_end
            continue
        objective = LoopObjective(model, phase.loss)
        source = build_source(recipe, tokenizer, phase) if phase.difficulties else base_source
        every = phase.loss.last_kv_every
        if every and d.kind != "synthetic":
            raise ValueError(f"phase {phase.name!r}: loss.last_kv_every needs synthetic data (where the answer "
                             f"begins), not data.kind={d.kind!r}")
        optimizer = _optimizer(model, phase, recipe)
        scheduler = _schedule(optimizer, phase)
        if restored is not None and restored[0]["phase"] == phase_idx:
            optimizer.load_state_dict(restored[1])
            scheduler.load_state_dict(restored[0]["scheduler"])
            restored = None
        objective, optimizer = accel.prepare(objective, optimizer)
        micro = tc.batch_size // tc.grad_accum
        while step < min(phase_end, total):
            R, no_grad = loops_for_step(recipe, step)
            student = student_for_step(recipe, step, R)
            progress_frac = (step - phase_begin) / phase.steps
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, Any] = {}
            for a in range(tc.grad_accum):
                batch = source.batch(step * tc.grad_accum + a, micro, rank=rank, world=world)
                ids, labels = batch.input_ids.to(accel.device), batch.labels.to(accel.device)
                n_local = (labels != losses.IGNORE_INDEX).sum()
                n_global = accel.reduce(n_local.clone(), reduction="sum")
                with accel.autocast():
                    hops = batch.hop_labels.to(accel.device) if batch.hop_labels is not None else None
                    decode_from = batch.prompt_len if every and step % every == 0 else None
                    out = objective(ids, labels, num_loops=R, no_grad_loops=no_grad, progress=progress_frac,
                                    student_loop=student, hop_labels=hops, decode_from=decode_from)
                # this process's share of the global mean (DDP averages gradients over processes)
                share = n_local.float() * world / n_global.clamp(min=1).float()
                accel.backward(out.loss * share / tc.grad_accum)
                _accumulate(sums, out, share / tc.grad_accum)
                tokens_seen += int(ids.numel()) * world
            grad_norm = accel.clip_grad_norm_(
                [p for p in objective.parameters() if p.requires_grad], tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == total:
                now = time.perf_counter()
                last_log = _log_record(accel, sums, step=step, phase=phase.name, R=R, processes=world,
                                       lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                                       tokens_per_s=tokens_seen / max(now - t_window, 1e-9))
                tokens_seen, t_window = 0, now
                if accel.is_main_process:
                    with log_file.open("a") as f:
                        f.write(json.dumps(last_log) + "\n")
                    bar.set_postfix(loss=last_log["loss"], ce=last_log["ce"][-1], R=R)
            if step % tc.eval_every == 0 or step == total:
                last_eval = _evaluate(accel, model, tokenizer, recipe, val_source, max_loops)
                if accel.is_main_process and last_eval is not None:
                    with log_file.open("a") as f:
                        f.write(json.dumps({"step": step, "eval": last_eval}) + "\n")
                    bar.write(f"step {step} eval " + _short(last_eval))
            if step % tc.save_every == 0 or step == total:
                accel.wait_for_everyone()
                if accel.is_main_process:
                    ckpt.save_checkpoint(out_dir, step, model=accel.unwrap_model(objective).model, optimizer=optimizer,
                                         scheduler=scheduler, tokenizer=tokenizer, task=recipe.task_card(),
                                         keep=tc.keep_checkpoints,
                                         state={"phase": phase_idx, "fingerprint": fingerprint,
                                                "recipe": recipe.name})
        model = accel.unwrap_model(objective).model
        accel.free_memory()
        phase_begin = phase_end
        if step >= total:
            break
    bar.close()
    model_dir = out_dir / "model"
    accel.wait_for_everyone()
    if accel.is_main_process:
        for p in model.parameters():
            p.requires_grad_(True)
        save(model.eval(), model_dir, tokenizer=tokenizer, task=recipe.task_card(), overwrite=overwrite)
    return FitResult(out_dir, model_dir, step, time.perf_counter() - t_start, last_log, last_eval)


def _resume(out_dir: Path, fingerprint: str, *, set_aside: bool):
    """(model, state, RNG, optimizer state) of the newest checkpoint that reads back; None when there is none.

    A corrupt newer one (a file that does not hash as written) is skipped with a warning naming it and,
    by the main process, renamed step-NNNNNN.corrupt so that it is neither resumed nor pruned (issue 12).
    When none reads back, nothing is renamed and the error says so."""
    found = ckpt.list_checkpoints(out_dir)
    corrupt: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            result = ckpt.load_checkpoint(path, fingerprint=fingerprint)
        except ckpt.CorruptCheckpoint as e:
            corrupt.append((path, str(e)))
            continue
        for bad, why in corrupt:
            aside = ckpt.set_aside(bad) if set_aside else bad
            log.warning("looplm: corrupt checkpoint: %s; resuming from %s (the corrupt one is kept as %s)",
                        why, path.name, aside.name)
        return result
    if corrupt:
        raise CheckpointError(f"no checkpoint in {out_dir / 'checkpoints'} reads back: "
                              + "; ".join(why for _, why in corrupt) + ". Pass --fresh to start over")
    return None


def _accumulate(sums: dict[str, Any], out, weight) -> None:
    w = float(weight)
    sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach()) * w
    sums["ce"] = sums.get("ce", 0) + out.ce.detach().float().cpu() * w
    for k, v in out.stats.items():
        sums[k] = sums.get(k, 0) + v.detach().float().cpu() * w


def _log_record(accel, sums: dict[str, Any], **fields) -> dict[str, Any]:
    """Average the step's statistics over processes (each already weighted by its token share)."""
    record: dict[str, Any] = dict(fields)
    for k, v in sums.items():
        t = torch.as_tensor(v, dtype=torch.float32, device=accel.device)
        t = accel.reduce(t, reduction="mean").cpu()
        record[k] = round(float(t), 5) if t.dim() == 0 else [round(x, 5) for x in t.tolist()]
    if "exit_pdf" in record:
        pdf = torch.tensor(record["exit_pdf"])
        record["mean_loops"] = round(float((pdf * torch.arange(1, len(pdf) + 1)).sum()), 4)
    return record


def _evaluate(accel, model, tokenizer, recipe, val_source, max_loops):
    if not accel.is_main_process:
        return None
    if recipe.data.kind == "synthetic":
        return evaluate_synthetic(model, tokenizer, recipe, count=recipe.train.eval_problems, max_loops=max_loops)
    if val_source is not None:
        return evaluate_text(model, val_source, max_loops=max_loops)
    return None


def _short(ev: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in ev.items() if k.startswith(("acc@", "nll@", "mean_loops")))
