"""The `looplm` command line: one typed function per subcommand; its docstring is its --help."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Optional

import typer

# Only typer at the top: torch, transformers and the rest are imported inside the subcommands, so
# `looplm --help` (and a mistyped option) answer at once (issue 12).

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Looped language models: compute and memory budgets per request.")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}

# Options that several subcommands share.
Threads = Annotated[Optional[int], typer.Option(
    help="CPU threads for torch (torch.set_num_threads). Default: torch's own, one per physical core; "
         "use 1 or 2 when other jobs share the CPU (decode slows several-fold when threads are oversubscribed).")]
Device = Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")]


def _version(value: bool) -> None:
    if value:
        import looplm

        print(f"looplm {looplm.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print looplm's version and exit.")] = False,
) -> None:
    """Looped language models: compute and memory budgets per request."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _setup(*, threads: int | None, device: str | None = None) -> None:
    """Check --threads and --device before any work (one-line errors), then set torch's threads."""
    if threads is not None and threads < 1:
        _fail(f"--threads must be ≥ 1, got {threads}")
    import torch

    if device is not None:
        try:
            check_device(device)
        except ValueError as e:
            _fail(str(e))
    if threads is not None:
        torch.set_num_threads(threads)


def check_device(device: str) -> None:
    """ValueError naming --device unless it is cpu, or cuda[:N] with that GPU present."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ValueError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {device!r}: {why} (torch {torch.__version__}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0..)")


@app.command()
def generate(
    prompt: Annotated[Optional[list[str]], typer.Option(help="Prompt text; repeat for a batch. Without it, the prompt is read from stdin (piped).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model dir (Ouro, looplm, HF Llama-family) or .gguf (converted once, cached); default SmolLM2-135M-Instruct.")] = None,
    loops: Annotated[Optional[int], typer.Option(help="Loops of the core per token (default: the model's); the cap with --exit.")] = None,
    exit: Annotated[Optional[str], typer.Option("--exit", help="Exit policy per token, e.g. q:0.6, conv:0.02, kl:1e-3, entropy:1.0, 'q:0.6|conv:0.02,min=2'.")] = None,
    core: Annotated[Optional[str], typer.Option(help="Loop layers I..J-1 of the model (a retrofit): I:J.")] = None,
    kv: Annotated[str, typer.Option(help="KV strategy: per_loop | last | mean | first.")] = "per_loop",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling (each prompt gets its own generator).")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--raw", help="Wrap prompts in the model's chat template (default: when it has one).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print tokens, loops per token, KV bytes and timings as JSON.")] = False,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Print tokens as they come (default: for one prompt). With --json: a JSON line per new token ({prompt, token, text, loops}) before the report.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16.")] = "float32",
    device: Device = "cpu",
    threads: Threads = None,
) -> None:
    """Generate text from a looped (or ordinary) model with a fixed loop count and a KV strategy.

    The prompt comes from --prompt (repeat it for a batch) or, without it, from stdin:
    `echo "Why is the sky blue?" | looplm generate`."""
    _setup(threads=threads, device=device)
    from looplm.engine import stop_tokens_for, stream as stream_tokens
    from looplm.evaluation.runner import encode_prompt

    prompts = _read_prompts(prompt)
    streaming = (len(prompts) == 1 and not json_out) if stream is None else stream
    if streaming and len(prompts) > 1 and not json_out:
        _fail(f"--stream prints one prompt's text as it comes; with {len(prompts)} prompts add --json (a JSON line per token)")
    try:
        _check_budget(kvs=[kv], exits=[exit] if exit else [])
        t0 = time.perf_counter()
        path, net, tok = _load(model, dtype, device, core=_block(core))
        load_seconds = time.perf_counter() - t0
        use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
        if use_chat and not getattr(tok, "chat_template", None):
            _fail(f"{path} has no chat template; use --raw")
        ids = [encode_prompt(tok, p, chat=use_chat) for p in prompts]
        stop = stop_tokens_for(net.config, tok)
        gen = stream_tokens(net, ids, max_new_tokens=max_new_tokens, num_loops=loops, exit=exit, kv=kv,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop,
                            pad_token_id=tok.pad_token_id)
    except ValueError as e:  # bad input: a clear message, no traceback
        _fail(str(e))
    if streaming and json_out:
        _stream_json(gen, tok)
    elif streaming:
        _stream_text(gen, tok)
    else:
        _run_with_progress(gen)
    res = gen.result()
    texts = [tok.decode([t for t in toks if t not in stop]) for toks in res.new_tokens]
    histogram = _loops_histogram(res.loops_per_token, gen.num_loops)
    if json_out:
        report = {
            "model": path,
            "num_loops": gen.num_loops,
            "exit": res.exit_policy,
            "mean_loops": round(res.mean_loops, 4),
            "loops_histogram": histogram,
            "kv": {"strategy": res.kv_strategy, "bytes": res.kv_bytes, "bytes_per_token": res.kv_bytes_per_token,
                   "allocated_bytes": res.kv_allocated_bytes},
            "timings": {"load_s": round(load_seconds, 4), "prefill_s": round(res.prefill_seconds, 4),
                        "decode_s": round(res.decode_seconds, 4),
                        "decode_tokens_per_s": round(res.decode_tokens_per_second, 2)},
            "completions": [
                {"prompt": p, "text": t, "tokens": toks, "loops_per_token": loops_row[: len(toks)],
                 "finish_reason": why}
                for p, t, toks, loops_row, why in zip(prompts, texts, res.new_tokens, res.loops_per_token.tolist(),
                                                      res.finish_reasons)
            ],
        }
        print(json.dumps(report))
        return
    if len(prompts) > 1:
        for p, t in zip(prompts, texts):
            typer.secho(f"> {p}", bold=True)
            print(t.strip() + "\n")
    elif not streaming:
        print(texts[0])
    if gen.policy is not None:
        bars = "  ".join(f"{r}:{'#' * round(20 * n / max(1, res.num_new_tokens))}{n}" for r, n in histogram.items())
        typer.secho(f"[loops per token under {res.exit_policy}: mean {res.mean_loops:.2f} of {gen.num_loops}  {bars}]",
                    dim=True, err=True)
    typer.secho(
        f"[{res.num_new_tokens} tokens, {gen.num_loops} loops, kv={res.kv_strategy} {res.kv_bytes / 2**20:.2f} MiB "
        f"({res.kv_bytes_per_token} B/token), prefill {res.prefill_seconds * 1e3:.0f} ms, "
        f"decode {res.decode_tokens_per_second:.1f} tok/s]",
        dim=True, err=True,
    )


@app.command()
def calibrate(
    text: Annotated[str, typer.Option(help="Calibration text file (plain UTF-8), e.g. shared/data/text/tinystories_val.txt.")],
    model: Annotated[Optional[str], typer.Option(help="Model dir; default SmolLM2-135M-Instruct.")] = None,
    policy: Annotated[str, typer.Option(help="q | conv | kl | entropy.")] = "q",
    target_mean_loops: Annotated[Optional[float], typer.Option(help="Mean loops per token to hit.")] = None,
    max_quality_loss: Annotated[Optional[float], typer.Option(help="Allowed NLL increase (nats/token) over full depth.")] = None,
    loops: Annotated[Optional[int], typer.Option(help="Loops R (the cap).")] = None,
    core: Annotated[Optional[str], typer.Option(help="Loop layers I..J-1 of the model (a retrofit): I:J.")] = None,
    skip_tokens: Annotated[int, typer.Option(help="Tokens of the text to skip first (calibrate on held-out text).")] = 0,
    min_loops: Annotated[int, typer.Option(help="Never exit before this loop.")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Tokens of calibration text to use.")] = 16384,
    seq_len: Annotated[int, typer.Option(help="Tokens per chunk.")] = 256,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result (and the frontier) as JSON.")] = False,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16.")] = "float32",
    device: Device = "cpu",
    threads: Threads = None,
) -> None:
    """Find the exit threshold that hits a target mean loop count (or quality loss) on calibration text."""
    import dataclasses
    from pathlib import Path

    _setup(threads=threads, device=device)
    from looplm.calibrate import calibrate as find_threshold

    if not Path(text).is_file():
        _fail(f"calibration text {text!r} does not exist")
    try:
        _, net, tok = _load(model, dtype, device, core=_block(core))
        ids = tok(Path(text).read_text())["input_ids"][skip_tokens:]
        cal = find_threshold(net, [ids], policy=policy, target_mean_loops=target_mean_loops,
                             max_quality_loss=max_quality_loss, num_loops=loops, tokenizer=tok, seq_len=seq_len,
                             max_tokens=max_tokens, min_loops=min_loops, progress=True)
    except ValueError as e:
        _fail(str(e))
    if json_out:
        print(json.dumps(dataclasses.asdict(cal)))
        return
    R = len(cal.nll_static)
    print(f"policy      {cal.policy}    (use: looplm generate --exit '{cal.policy}' --loops {R})")
    print(f"tokens      {cal.tokens}")
    print(f"mean loops  {cal.mean_loops:.3f} of {R}  ({cal.mean_loops / R:.0%} of full-depth compute in the core)")
    print(f"NLL         {cal.nll:.4f} at the exits vs {cal.nll_full_depth:.4f} at full depth "
          f"({cal.nll - cal.nll_full_depth:+.4f} nats/token)")
    print("static      " + "  ".join(f"R={r}: {n:.4f}" for r, n in enumerate(cal.nll_static, start=1)))


retrofit_app = typer.Typer(help="Loop a block of a pretrained model (shared weights); search which block helps.")
app.add_typer(retrofit_app, name="retrofit")


@retrofit_app.callback(invoke_without_command=True)
def retrofit(
    ctx: typer.Context,
    core: Annotated[Optional[str], typer.Option(help="Layers I..J-1 to loop: I:J.")] = None,
    save: Annotated[Optional[str], typer.Option(help="Where to write the looplm dir (records the source and the block).")] = None,
    model: Annotated[Optional[str], typer.Option(help="HF Llama-family (or any looplm-loadable) dir; default SmolLM2-135M-Instruct.")] = None,
    loops: Annotated[int, typer.Option(help="Default loop count R of the result.")] = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --save's path whatever it holds. Without it, only a looplm checkpoint (a dir looplm wrote, with no files of yours) is replaced; anything else is refused.")] = False,
) -> None:
    """Loop a block of a pretrained model with shared weights and save it as a looplm dir
    (`looplm retrofit --core I:J --save DIR`); `looplm retrofit search` finds which block to loop."""
    if ctx.invoked_subcommand is not None:
        return
    from looplm.checkpoint import default_model_dir, load, save as save_dir  # not looplm.load: no transformers
    from looplm.outputs import check_output, is_looplm_checkpoint

    if core is None or save is None:
        _fail("--core and --save are required (or use `looplm retrofit search ...`)")
    try:
        check_output(save, ours=is_looplm_checkpoint, what="a looplm checkpoint", overwrite=overwrite)  # before loading
        path = model or str(default_model_dir())
        net = load(path, core=_block(core), num_loops=loops)
        out = save_dir(net, save, tokenizer_from=path, overwrite=overwrite)
    except (ValueError, OSError) as e:
        _fail(str(e))
    c = net.config
    print(f"{out}: prelude {c.num_prelude_layers} + core {c.num_core_layers} x {c.num_loops} loops + coda "
          f"{c.num_coda_layers} layers; weights {net.weight_bytes() / 2**20:.1f} MiB (held once)")


@retrofit_app.command("search")
def retrofit_search(
    task: Annotated[str, typer.Option(help="Multiple-choice task: arc-easy | arc-challenge | mmlu[:subject] | mc:PATH.")] = "arc-easy",
    model: Annotated[Optional[str], typer.Option(help="HF Llama-family dir; default SmolLM2-135M-Instruct.")] = None,
    limit: Annotated[int, typer.Option(help="Probe items: the task's first N.")] = 100,
    holdout: Annotated[Optional[int], typer.Option(help="Held-out items after the probe to re-score the top k on (default: = --limit).")] = None,
    sizes: Annotated[str, typer.Option(help="Block sizes in layers: 1-8, 1,2,4 or 1-3,6.")] = "1-8",
    loops: Annotated[str, typer.Option(help="Loop counts r ≥ 2 to try, e.g. 2,3 (r = 1 is the baseline).")] = "2,3",
    starts: Annotated[Optional[str], typer.Option(help="Start layers to try, as 0-based indices, e.g. 0,4,8 (default: all).")] = None,
    top_k: Annotated[int, typer.Option(help="Best candidates to re-score on the held-out items.")] = 5,
    metric: Annotated[str, typer.Option(help="Rank by acc (accuracy gain) or nll (drop in the gold answer's NLL per token).")] = "acc",
    batch_size: Annotated[int, typer.Option(help="Items per forward.")] = 16,
    shots: Annotated[int, typer.Option(help="Few-shot examples per prompt.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for few-shot sampling and bootstrap.")] = 0,
    data_dir: Annotated[Optional[str], typer.Option(help="Benchmark files in the layout of shared/data (default: ../shared/data).")] = None,
    out: Annotated[str, typer.Option(help="Output dir: search.json, heatmap.png and the resumable cache (.cache/).")] = "out/retrofit-search",
    rows: Annotated[int, typer.Option(help="Candidates shown in the table.")] = 15,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
    threads: Threads = None,
) -> None:
    """Score every block i..j-1 looped r times on a probe split by log-likelihood (the prelude and loop 1
    are reused across candidates), rank against the unlooped model with paired bootstrap intervals,
    re-score the top k on held-out items, draw a heatmap of Δscore over (i, j). Resumes when interrupted."""
    from pathlib import Path

    _setup(threads=threads)
    from looplm import retrofit_search as rs
    from looplm.evaluation import tasks

    try:
        size_list = rs.parse_ints(sizes, what="--sizes")
        loop_list = rs.parse_ints(loops, what="--loops")
        start_list = None if starts is None else rs.parse_ints(starts, what="--starts", minimum=0)
        path, net, tok = _load(model, "float32", "cpu")
        cands = rs.make_candidates(net.config.num_layers, sizes=size_list, loops=loop_list, starts=start_list)
        the_task = tasks.load_task(task, data_dir=data_dir, shots=shots, seed=seed)
        res = rs.search(net, tok, the_task, cands, limit=limit, holdout=limit if holdout is None else holdout,
                        top_k=top_k, metric=metric, out=Path(out), batch_size=batch_size, shots=shots, seed=seed,
                        progress=not json_out)
    except ValueError as e:
        _fail(str(e))
    js, png = rs.write(res, Path(out))
    if json_out:
        print(json.dumps(res.to_dict()))
        return
    print(rs.table(res, rows=rows))
    print(f"{res.scored_candidates} candidates × {res.probe_items} probe items in {res.seconds:.0f} s "
          f"(+ {res.held_out_seconds:.0f} s held-out); wrote {js} and {png}")


@app.command()
def analyze(
    model: Annotated[Optional[str], typer.Option(help="Model dir; default SmolLM2-135M-Instruct.")] = None,
    core: Annotated[Optional[str], typer.Option(help="The looped block I:J (default: the model's core).")] = None,
    compare: Annotated[Optional[list[str]], typer.Option(help="Other blocks I:J to diagnose alongside; repeatable.")] = None,
    loops: Annotated[int, typer.Option(help="Loops to run.")] = 4,
    text: Annotated[Optional[str], typer.Option(help="Text file (default: shared/data/text/tinystories_val.txt).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens of text to use.")] = 1024,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    out: Annotated[str, typer.Option(help="Output dir for analysis.json and analysis.png.")] = "out/analyze",
    threads: Threads = None,
) -> None:
    """Per loop and per layer: hidden-state change and cosine between loops (fixed point?), logit-lens entropy."""
    import copy
    from pathlib import Path

    _setup(threads=threads)
    from looplm import analysis
    from looplm.calibrate import chunk_tokens
    from looplm.checkpoint import with_loops
    from looplm.evaluation.tasks import default_data_dir

    try:
        path, net, tok = _load(model, "float32", "cpu", core=_block(core))
        if text is None:
            root = default_data_dir()
            text = str(root / "text" / "tinystories_val.txt") if root else None
        if text is None or not Path(text).is_file():
            raise ValueError(f"text file {text!r} does not exist; pass --text")
        seqs = chunk_tokens([Path(text).read_text()[: max_tokens * 8]], tokenizer=tok, seq_len=seq_len,
                            max_tokens=max_tokens)
        results = [analysis.diagnose(net, seqs, num_loops=loops)]
        for other in compare or []:  # the same weights, another block looped
            view = copy.copy(net)
            view.config = with_loops(net.config, core=_block(other))
            results.append(analysis.diagnose(view, seqs, num_loops=loops))
    except ValueError as e:
        _fail(str(e))
    js, png = analysis.write(results, Path(out))
    for d in results:
        print(f"core {d.core[0]}:{d.core[1]} ({d.tokens} tokens)")
        for r in range(d.loops):
            print(f"  loop {r + 1}: change {d.rel_change[r]:.4f}  cosine {d.cosine[r]:.4f}  entropy {d.entropy[r]:.3f}")
    print(f"wrote {js} and {png}")


@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML (see recipes/).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, dotted: train.batch_size=32 phases.0.steps=100.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore (and delete) checkpoints in output_dir; start over.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this global step, ≥ 1 (checkpoint kept; run again to go on).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into output_dir whatever it holds. Without it, output_dir must be absent, empty or a looplm training dir (checkpoints/, log.jsonl, recipe.json, model/ and nothing of yours), which it resumes.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch per process (= the override train.threads=N). Default: the recipe's train.threads, else torch's own, one per physical core.")] = None,
) -> None:
    """Train a looped model from a recipe; resumes from the newest checkpoint in its output_dir.

    Runs on this CPU as is, and unchanged on many GPUs: `accelerate launch -m looplm train RECIPE` or
    `torchrun --nproc_per_node N -m looplm train RECIPE` (DDP; FSDP through `accelerate config`).
    """
    _setup(threads=threads)
    from looplm.train import fit, load_recipe

    if threads is not None:  # the trainer sets the recipe's threads: the option overrides the recipe
        overrides = [*(overrides or []), f"train.threads={threads}"]
    if max_steps is not None and max_steps < 1:
        _fail(f"--max-steps must be ≥ 1, got {max_steps} (no step would write an untrained model)")
    try:
        r = load_recipe(recipe, overrides or [])
        res = fit(r, resume=not fresh, max_steps=max_steps, overwrite=overwrite)
    except (ValueError, OSError) as e:
        _fail(str(e))
    if res.last_eval:
        print("eval  " + "  ".join(f"{k} {v}" for k, v in res.last_eval.items() if not isinstance(v, dict)))
    print(f"{res.steps} steps in {res.seconds:.0f} s; model → {res.model_dir}")


@app.command()
def demo(
    model: Annotated[Optional[str], typer.Option(help="A looplm dir trained on a synthetic task; default: the bundled model.")] = None,
    problems: Annotated[int, typer.Option(help="Held-out problems per difficulty.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the held-out problems (another seed, other problems; e.g. to choose an exit threshold on problems the reported table does not use).")] = 12345,
    exit: Annotated[Optional[str], typer.Option("--exit", help="Exit policy for the Q-exit table (default: the model card's).")] = None,
    out: Annotated[str, typer.Option(help="Where to write demo.png and demo.json: a dir that is absent, empty or a previous demo's output.")] = "out/demo",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write demo.png and demo.json into --out whatever it holds (other files stay; a file at --out is replaced).")] = False,
    threads: Threads = None,
) -> None:
    """The bundled looped model on held-out multi-hop problems: accuracy × loops × difficulty, mean loops
    under Q-exit by difficulty, KV memory and speed per strategy; writes a PNG of the curves."""
    _setup(threads=threads)
    from looplm import demo as demo_mod
    from looplm.outputs import check_output, is_demo_output

    if problems < 1:
        _fail(f"--problems must be ≥ 1, got {problems}")
    if seed < 0:
        _fail(f"--seed must be ≥ 0, got {seed}")
    try:
        check_output(out, ours=is_demo_output, what="a looplm demo output dir", overwrite=overwrite)  # before the run
        res = demo_mod.run_demo(model, per_difficulty=problems, exit=exit, seed=seed, progress=not json_out)
        png, js = demo_mod.write(res, out, overwrite=overwrite)
    except (ValueError, OSError) as e:
        _fail(str(e))
    if json_out:
        print(demo_mod.to_json(res))
        return
    print(demo_mod.format_tables(res))
    print(f"\n{res.seconds:.0f} s; wrote {png} and {js}")


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="Model dir (Ouro, looplm, HF Llama-family) or .gguf; default SmolLM2-135M-Instruct.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    kv: Annotated[str, typer.Option(help="KV strategies served, comma-separated (one engine and KV pool each), each optionally with ':int8' (int8 KV); the first is the default, a request picks another with its `kv` field.")] = "last",
    max_loops: Annotated[Optional[int], typer.Option(help="The most loops a request may ask for (default: the model's num_loops).")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Requests running at once per engine (KV pool rows).")] = 32,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a row; past it a request gets 503.")] = 256,
    max_kv_tokens: Annotated[Optional[int], typer.Option(help="KV positions each engine may reserve (prompt + max_tokens per running request); default max(8192, the model's context).")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="The model's name in the API (default: the model dir's name).")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="LOOPLM_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize.")] = None,
    chat_template: Annotated[Optional[str], typer.Option(help="A Jinja chat template (a file, or the template itself) for a model whose tokenizer has none, or to replace its own.")] = None,
    kv_store: Annotated[Optional[list[str]], typer.Option("--kv-store", help="A tier of the KV prefix store, repeatable, fastest first: host:4GiB | disk:PATH:20GiB | redis://HOST:PORT (docs/memory.md).")] = None,
    kv_chunk_size: Annotated[int, typer.Option(help="Prompt positions per chunk of the KV prefix store (a prefix is reused in whole chunks).")] = 256,
    prefix_kv: Annotated[str, typer.Option(help="What a stored chunk holds under last/mean/first: loops (every loop's KV; warm ≡ a single-pass prefill) | committed (the strategy's KV, 1/R of the core's bytes; prompts prefill chunk by chunk).")] = "loops",
    replicas: Annotated[Optional[int], typer.Option(help="Serve on Ray Serve with N replicas, each with its own engine (docs/scaleout.md); without it nothing imports Ray.")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="With --replicas: autoscale between --replicas and this many on ongoing requests.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="With --replicas: join this Ray cluster (e.g. auto) instead of starting one.")] = None,
    router: Annotated[str, typer.Option(help="With --replicas: prefix (the replica that served the prompt's leading chunks, else the least loaded) | pow2 (Ray's default).")] = "prefix",
    engine_process: Annotated[bool, typer.Option(help="Run the engines in a process of their own (the default), so that their Python never waits on the HTTP side's interpreter lock; --no-engine-process keeps them in a thread of the server process.")] = True,
    core: Annotated[Optional[str], typer.Option(help="Loop layers I..J-1 of the model (a retrofit): I:J.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16.")] = "float32",
    device: Device = "cpu",
    threads: Threads = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level: critical | error | warning | info | debug.")] = "info",
) -> None:
    """Serve a model with an OpenAI-compatible API (FastAPI + uvicorn): /v1/completions, /v1/chat/completions,
    /v1/models, streaming, /health, /metrics, /tokenize, /detokenize, and a playground page at /.

    Each request chooses its own budget with extra body fields: num_loops, exit (e.g. "q:0.6"), kv (one
    of --kv). /health answers 503 while the model loads. SIGTERM stops accepting, finishes what runs, exits."""
    from pathlib import Path

    _setup(threads=threads, device=device)
    kvs = [k.strip() for k in kv.split(",") if k.strip()]
    try:
        from looplm.pool import parse_kv

        for k in kvs:  # a strategy, optionally with ':int8'
            parse_kv(k)
        if not kvs or len(set(kvs)) != len(kvs):
            raise ValueError(f"--kv {kv!r}: list each strategy once")
        for name, value in (("--max-batch-size", max_batch_size), ("--max-queue", max_queue), ("--port", port)):
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        if max_loops is not None and max_loops < 1:
            raise ValueError(f"--max-loops must be ≥ 1, got {max_loops}")
        if max_kv_tokens is not None and max_kv_tokens < 1:
            raise ValueError(f"--max-kv-tokens must be ≥ 1, got {max_kv_tokens}")
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if model is not None and not Path(model).exists():
            raise ValueError(f"--model {model!r}: no such file or directory")
        block = _block(core)
        if replicas is not None and replicas < 1:
            raise ValueError(f"--replicas must be ≥ 1, got {replicas}")
        if max_replicas is not None and (replicas is None or max_replicas < replicas):
            raise ValueError(f"--max-replicas {max_replicas} needs --replicas ≤ it")
        if (ray_address is not None or router != "prefix") and replicas is None:
            raise ValueError("--ray-address and --router need --replicas")
        if router not in ("prefix", "pow2"):
            raise ValueError(f"--router {router!r}: choose prefix or pow2")
        if prefix_kv not in ("loops", "committed"):
            raise ValueError(f"--prefix-kv {prefix_kv!r}: choose loops or committed")
        if kv_store:
            from looplm.store import PrefixStore
            PrefixStore.from_specs(kv_store, chunk_size=kv_chunk_size)  # refuse a bad spec now, not when loaded
        template = chat_template
        if chat_template is not None and Path(chat_template).is_file():
            template = Path(chat_template).read_text()
    except ValueError as e:
        _fail(str(e))
    import uvicorn

    from functools import partial

    from looplm.server.app import ServerOptions, create_app, load_model

    load = partial(load_model, model, DTYPES[dtype], device, block, threads)  # pickles: the engine process runs it
    opts = ServerOptions(model_name=served_model_name, kvs=kvs, max_loops=max_loops, max_batch_size=max_batch_size,
                         max_queue=max_queue, max_kv_tokens=max_kv_tokens, api_key=api_key, chat_template=template,
                         kv_store=list(kv_store or []), kv_chunk_size=kv_chunk_size,
                         prefix_kv=prefix_kv, engine_process=engine_process)
    if replicas is not None:
        from looplm.checkpoint import default_model_dir
        from looplm.server import scaleout

        scaleout.run(opts=opts, load_args=(model, DTYPES[dtype], device, block, threads), replicas=replicas,
                     max_replicas=max_replicas, ray_address=ray_address, host=host, port=port, router=router,
                     tokenizer_dir=model or str(default_model_dir()))
        return
    import signal

    # uvicorn handles SIGTERM (stop accepting, let open requests end, lifespan shutdown), then raises it again
    # with the handler it found; an ignoring one makes that graceful end exit 0 instead of "killed by SIGTERM"
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(create_app(load, opts), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60)


kv_store_app = typer.Typer(help="The KV prefix store's disk and Redis tiers (docs/memory.md): what they hold, or empty them.")
app.add_typer(kv_store_app, name="kv-store")
KVStoreSpecs = Annotated[list[str], typer.Option("--kv-store", help="A tier, repeatable: disk:PATH | redis://HOST:PORT (a size given is ignored; a host tier lives inside one server process).")]


def _kv_store(specs: list[str]):
    from looplm.store import PrefixStore

    try:
        return PrefixStore.from_specs(specs, admin=True)  # a disk tier is read, never evicted, by this command
    except ValueError as e:
        _fail(str(e))


@kv_store_app.command("stats")
def kv_store_stats(kv_store: KVStoreSpecs, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Entries, bytes and budget of each tier."""
    tiers = _kv_store(kv_store).stats()["tiers"]
    if as_json:
        print(json.dumps(tiers))
        return
    print(f"{'tier':<6} {'entries':>8} {'bytes':>14} {'budget':>14}  where")
    for t in tiers:
        where = t.get("path") or t.get("url", "")
        if t["tier"] == "redis":
            where += "" if t["up"] else "  (unreachable)"
            where += f"  policy={t['policy']}" if t.get("policy") else ""
        print(f"{t['tier']:<6} {t['entries'] if t['entries'] is not None else '-':>8} "
              f"{t['bytes'] if t['bytes'] is not None else '-':>14} {t['budget'] or '-':>14}  {where}")


@kv_store_app.command("clear")
def kv_store_clear(kv_store: KVStoreSpecs) -> None:
    """Delete every stored chunk from each tier."""
    for tier, n in _kv_store(kv_store).clear().items():
        print(f"{tier}: {n} entries deleted")


eval_app = typer.Typer(help="Evaluate under compute and memory budgets: tables, plots, comparisons.")
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
def eval_run(
    ctx: typer.Context,
    task: Annotated[Optional[str], typer.Option(help="arc-easy | arc-challenge | mmlu[:subject] | gsm8k | bbh[:task] | tinystories | shakespeare | text:PATH | mc:PATH | gen:PATH | refusal.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model dir; default SmolLM2-135M-Instruct.")] = None,
    loops: Annotated[Optional[str], typer.Option(help="Loop counts to sweep, e.g. 1,2,4,8 (static runs; the largest caps --exit).")] = None,
    exit: Annotated[Optional[str], typer.Option("--exit", help="Exit policies to sweep, e.g. q:0.3,q:0.6,conv:0.02 (min=/max= bind to the policy before).")] = None,
    kv: Annotated[str, typer.Option(help="KV strategies to sweep, e.g. per_loop,last.")] = "per_loop",
    core: Annotated[Optional[str], typer.Option(help="Loop layers I..J-1 of the model: I:J.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="First N items.")] = None,
    shots: Annotated[int, typer.Option(help="Few-shot examples per prompt.")] = 0,
    chat: Annotated[Optional[bool], typer.Option("--chat/--raw", help="Chat template (default: on for generation tasks when the model has one).")] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="Benchmark files in the layout of shared/data (default: ../shared/data).")] = None,
    out: Annotated[str, typer.Option(help="Output dir: run JSONs, the report and plots go to OUT/TASK, which must be absent, empty or a previous eval's output.")] = "out/eval",
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for few-shot sampling and bootstrap.")] = 0,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16.")] = "float32",
    device: Device = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into OUT/TASK whatever it holds (files of other names stay; a file at --out is replaced).")] = False,
    threads: Threads = None,
) -> None:
    """Evaluate a task over a sweep of loops × exit policies × KV strategies; resumes interrupted sweeps.

    The whole sweep is checked before the first run starts (e.g. q:0.6 needs a model with an exit gate)."""
    if ctx.invoked_subcommand is not None:
        return
    from pathlib import Path

    _setup(threads=threads, device=device)

    from looplm.evaluation import report, runner, tasks
    from looplm.outputs import check_output, is_eval_output, prepare_output_dir

    if task is None:
        _fail("--task is required (or use `looplm eval compare A.json B.json`)")
    task_dir = Path(out) / ("refusal" if task == "refusal" else task.replace(":", "_").replace("/", "_"))
    try:  # before anything runs (looplm.outputs): --out is a dir; the task's dir in it is new or a previous eval's
        check_output(out, ours=Path.is_dir, what="a directory", overwrite=overwrite)
        if overwrite:
            prepare_output_dir(out, ours=Path.is_dir, what="a directory", overwrite=True)
        check_output(task_dir, ours=is_eval_output, what="a looplm eval output dir", overwrite=overwrite)
    except (ValueError, OSError) as e:
        _fail(str(e))
    try:
        loop_list = [int(x) for x in loops.split(",")] if loops else [None]
    except ValueError:
        _fail(f"--loops {loops!r} must be comma-separated integers")
    if any(x is not None and x < 1 for x in loop_list):
        _fail(f"--loops {loops!r}: loop counts must be ≥ 1")
    try:
        kvs = [k.strip() for k in kv.split(",") if k.strip()]
        exits = runner.split_policies(exit)
        _check_budget(kvs=kvs, exits=exits)
        num_loops = max((x for x in loop_list if x), default=None)
        if task == "refusal":
            if exits:
                raise ValueError(f"--exit {exit!r}: --task refusal sweeps --loops and --kv only")
            from looplm.evaluation import refusal

            path, net, tok = _load(model, dtype, device, core=_block(core), num_loops=num_loops)
            refusal.main(net, tok, data_dir=data_dir, loops=loop_list, kvs=kvs, limit=limit, out=Path(out), seed=seed)
            return
        the_task = tasks.load_task(task, data_dir=data_dir, shots=shots, limit=limit, seed=seed)  # before the model
        path, net, tok = _load(model, dtype, device, core=_block(core), num_loops=num_loops)
        use_chat = (the_task.kind == "gen" and bool(getattr(tok, "chat_template", None))) if chat is None else chat
        configs = runner.sweep_configs(path, task, loops=loop_list, exits=exits, kvs=kvs, shots=shots, limit=limit,
                                       chat=use_chat, seed=seed, core=core, dtype=DTYPES.get(dtype, dtype))
        out_dir = Path(out) / task.replace(":", "_").replace("/", "_")
        paths = runner.run_sweep(net, tok, the_task, configs, out_dir, batch_size=batch_size)  # checks the whole sweep first
    except ValueError as e:
        _fail(str(e))
    rep = report.write_report(paths, out_dir)
    print(report.table([report.load_run(p) for p in paths]))
    print(f"runs: {', '.join(str(p) for p in paths)}\nreport: {rep}")


@eval_app.command("compare")
def eval_compare(
    a: Annotated[str, typer.Argument(help="Run JSON A (the baseline).")],
    b: Annotated[str, typer.Argument(help="Run JSON B.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Is B different from A? Paired bootstrap over the items both scored."""
    from looplm.evaluation import report

    try:
        res = report.compare(a, b)
    except ValueError as e:
        _fail(str(e))
    if json_out:
        print(json.dumps(res))
        return
    d = res["difference_b_minus_a"]
    print(f"{res['task']} ({res['metric']}, {d['n']} paired items)")
    print(f"  A {res['a']['label']}: {res['a']['mean']:.4f}  (mean loops {res['a']['mean_loops']:.2f})")
    print(f"  B {res['b']['label']}: {res['b']['mean']:.4f}  (mean loops {res['b']['mean_loops']:.2f})")
    verdict = "significant" if d["significant"] else "not significant"
    print(f"  B − A = {d['mean']:+.4f}, 95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], p = {d['p_value']:.3f}: {verdict}")


def _block(core: str | None) -> tuple[int, int] | None:
    """--core I:J → (I, J)."""
    if core is None:
        return None
    try:
        i, j = (int(x) for x in core.split(":"))
    except ValueError:
        raise ValueError(f"--core {core!r} must be I:J (two layer indices)") from None
    return i, j


def _load(model: str | None, dtype: str, device: str, *, core=None, num_loops=None):
    """(path, model, tokenizer) for --model (default: SmolLM2-135M-Instruct); ValueError on bad input."""
    import torch

    from looplm.checkpoint import default_model_dir, load, load_tokenizer  # not looplm.load: no transformers models

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    path = model or str(default_model_dir())
    net = load(path, core=core, num_loops=num_loops, dtype=getattr(torch, DTYPES[dtype]), device=device)
    # a .gguf loads from its cached conversion, which holds the tokenizer too (reading it from the GGUF is slow)
    return path, net, load_tokenizer(getattr(net, "name_or_path", path))


def _check_budget(*, kvs: list[str], exits: list[str]) -> None:
    """ValueError for a KV strategy or exit policy that does not parse (before a model is loaded)."""
    from looplm.cache import check_strategy
    from looplm.exits import parse_exit

    for k in kvs:
        check_strategy(k)
    for e in exits:
        parse_exit(e)


def _read_prompts(prompt: list[str] | None) -> list[str]:
    """--prompt, else the whole of a piped stdin as one prompt; an error when there is neither."""
    if prompt:
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        _fail("no prompt: pass --prompt TEXT (repeat it for a batch) or pipe the prompt on stdin")
    text = sys.stdin.read()
    if not text.strip():
        _fail("no prompt: stdin was empty; pass --prompt TEXT or pipe the prompt on stdin")
    return [text.rstrip("\n")]


def _loops_histogram(loops_per_token, num_loops: int) -> dict[str, int]:
    """Count of generated tokens per loop count 1..R."""
    counts = [int((loops_per_token == r).sum()) for r in range(1, num_loops + 1)]
    return {str(r): n for r, n in zip(range(1, num_loops + 1), counts)}


class _Detokenizer:
    """Per row, the text its new tokens add (stop tokens dropped): decode the row's tokens so far and
    print what is new, so multi-byte characters split across tokens come out whole."""

    def __init__(self, gen, tok):
        self.tok, self.stop = tok, set(gen.stop.tolist())
        self.tokens: list[list[int]] = [[] for _ in gen.ids]
        self.shown = ["" for _ in gen.ids]

    def add(self, step):
        """(row, token, text delta, loops) for every row that produced a token this step."""
        for i, (t, active, loops) in enumerate(zip(step.tokens.tolist(), step.active.tolist(), step.loops.tolist())):
            if not active:
                continue
            delta = ""
            if t not in self.stop:
                self.tokens[i].append(t)
                text = self.tok.decode(self.tokens[i])
                if not text.endswith("\ufffd"):  # wait for the rest of a split character
                    delta, self.shown[i] = text[len(self.shown[i]):], text
            yield i, t, delta, loops

    def rest(self):
        """(row, text not shown yet) at the end: a character that never completed."""
        for i, toks in enumerate(self.tokens):
            text = self.tok.decode(toks)
            if text != self.shown[i]:
                yield i, text[len(self.shown[i]):]


def _stream_text(gen, tok) -> None:
    """One prompt's text as it comes."""
    detok = _Detokenizer(gen, tok)
    for step in gen:
        for _, _, delta, _ in detok.add(step):
            sys.stdout.write(delta)
            sys.stdout.flush()
    sys.stdout.write("".join(text for _, text in detok.rest()) + "\n")


def _stream_json(gen, tok) -> None:
    """A JSON line per new token of every row, {"prompt": row, "token": id, "text": delta, "loops": n}
    (and, at the end, {"prompt": row, "token": null, "text": rest, "loops": null} for an unfinished character)."""
    detok = _Detokenizer(gen, tok)
    for step in gen:
        for i, t, delta, loops in detok.add(step):
            print(json.dumps({"prompt": i, "token": t, "text": delta, "loops": loops}), flush=True)
    for i, text in detok.rest():
        print(json.dumps({"prompt": i, "token": None, "text": text, "loops": None}), flush=True)


def _run_with_progress(gen) -> None:
    """Generate to the end with a progress bar (on a terminal)."""
    from tqdm import tqdm

    for _ in tqdm(gen, total=gen.max_new_tokens, desc="decode", unit="step", disable=not sys.stderr.isatty()):
        pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
