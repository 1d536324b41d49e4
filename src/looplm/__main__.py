"""The `looplm` command line: one typed function per subcommand; its docstring is its --help."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Looped language models: compute and memory budgets per request.")

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@app.callback()
def _root() -> None:
    """Looped language models: compute and memory budgets per request."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    prompt: Annotated[Optional[list[str]], typer.Option(help="Prompt text; repeat for a batch.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model dir (Ouro, looplm, HF Llama-family) or .gguf; default SmolLM2-135M-Instruct.")] = None,
    loops: Annotated[Optional[int], typer.Option(help="Loops of the core per token (default: the model's).")] = None,
    kv: Annotated[str, typer.Option(help="KV strategy: per_loop | last | mean | first.")] = "per_loop",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling (each prompt gets its own generator).")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--raw", help="Wrap prompts in the model's chat template (default: when it has one).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print tokens, loops per token, KV bytes and timings as JSON.")] = False,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")] = "cpu",
) -> None:
    """Generate text from a looped (or ordinary) model with a fixed loop count and a KV strategy."""
    import torch

    import looplm

    if dtype not in DTYPES:
        _fail(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    prompts = prompt or [DEFAULT_PROMPT]
    try:
        t0 = time.perf_counter()
        path = model or str(looplm.default_model_dir())
        net = looplm.load(path, dtype=getattr(torch, DTYPES[dtype]), device=device)
        tok = looplm.load_tokenizer(path if not path.endswith(".gguf") else net.name_or_path)
        load_seconds = time.perf_counter() - t0
        use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
        if use_chat and not getattr(tok, "chat_template", None):
            _fail(f"{path} has no chat template; use --raw")
        ids = [_encode(tok, p, use_chat) for p in prompts]
        stop = _stop_tokens(net, tok)
        gen = looplm.stream(net, ids, max_new_tokens=max_new_tokens, num_loops=loops, kv=kv, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop, pad_token_id=tok.pad_token_id)
    except ValueError as e:  # bad input: a clear message, no traceback
        _fail(str(e))
    _run_with_progress(gen, tok, single=len(prompts) == 1 and not json_out)
    res = gen.result()
    texts = [tok.decode([t for t in toks if t not in stop]) for toks in res.new_tokens]
    if json_out:
        report = {
            "model": path,
            "num_loops": gen.num_loops,
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
    typer.secho(
        f"[{res.num_new_tokens} tokens, {gen.num_loops} loops, kv={res.kv_strategy} {res.kv_bytes / 2**20:.2f} MiB "
        f"({res.kv_bytes_per_token} B/token), prefill {res.prefill_seconds * 1e3:.0f} ms, "
        f"decode {res.decode_tokens_per_second:.1f} tok/s]",
        dim=True, err=True,
    )


def _encode(tok, text: str, chat: bool) -> list[int]:
    if chat:
        out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tok.encode(text)


def _stop_tokens(net, tok) -> list[int]:
    eos = net.config.eos_token_id
    stop = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    if tok.eos_token_id is not None:
        stop.add(tok.eos_token_id)
    return sorted(stop)


def _run_with_progress(gen, tok, *, single: bool) -> None:
    """Stream one prompt's text as it comes; show a progress bar for a batch."""
    if single:
        shown, toks = "", []
        for step in gen:
            if bool(step.active[0]) and int(step.tokens[0]) not in gen.stop.tolist():
                toks.append(int(step.tokens[0]))
                text = tok.decode(toks)
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        sys.stdout.write("\n")
        return
    from tqdm import tqdm

    for _ in tqdm(gen, total=gen.max_new_tokens, desc="decode", unit="step", disable=not sys.stderr.isatty()):
        pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
