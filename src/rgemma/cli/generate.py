"""`rgemma generate`: the continuation of a prompt, streamed; or of each line of a
file, generated as one batch."""

from __future__ import annotations

import argparse
import sys

from . import options

EPILOG = """\
examples:
  rgemma generate "The capital of France is"
  rgemma generate "Tell me a story" --temperature 0.8 --top-p 0.95 --seed 1
  rgemma generate "The capital of France is" --temperature 0        # greedy
  rgemma generate "Once upon a time" --repetition-penalty 1.3 --min-tokens 20
  rgemma generate "Write a haiku" --chat --model ./recurrentgemma-2b-it
  rgemma generate --file prompts.txt --max-new-tokens 64 --stop "\\n\\n"
  echo "Once upon a time" | rgemma generate - --verbose

A single prompt is streamed to stdout. With --file, each non-blank line is a
prompt; they are generated as one batch and printed in order, each under a
"=== [i/n] prompt ===" header. Prompts read from stdin or a file must be UTF-8;
invalid bytes are replaced with U+FFFD and a warning is printed.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, description and examples of `rgemma generate`."""
    p.description = "Generate a continuation of PROMPT (or of each line of --file)."
    p.epilog = EPILOG
    p.add_argument(
        "prompt", nargs="?", metavar="PROMPT", help='the prompt; "-" reads it from stdin'
    )
    p.add_argument(
        "--file",
        metavar="PROMPTS.txt",
        help='one prompt per line ("-" for stdin), generated as a batch',
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="format each prompt as a user turn of the Gemma chat template",
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print token counts, speeds and the state size on stderr",
    )
    options.add_sampling_options(p)
    options.add_model_options(p)
    options.add_speed_options(p)


def _prompts(args: argparse.Namespace) -> list[str]:
    from ..errors import InputError

    if args.file is not None:
        if args.prompt is not None:
            raise InputError("give either PROMPT or --file, not both")
        options.check_input_file(args.file, "--file")
        try:
            text = options.read_text(args.file)
        except OSError as err:
            raise InputError(f"--file {args.file}: {err.strerror or err}") from None
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            where = "stdin" if args.file == "-" else args.file
            raise InputError(f"no prompts in {where}: it is empty (one prompt per line)")
        return prompts
    if args.prompt is None:
        raise InputError('no prompt: give PROMPT, "-" to read it from stdin, or --file')
    if args.prompt == "-":
        return [options.read_text("-").removesuffix("\n")]
    return [options.argv_text(args.prompt, "PROMPT")]


def _preview(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _compile_seconds(model) -> float:
    """Seconds the compiled decode step has spent compiling so far (0 if eager)."""
    return getattr(getattr(model, "decode_step", None), "compile_seconds", 0.0)


def run(args: argparse.Namespace) -> int:
    """Run `rgemma generate`: the continuation(s) on stdout (statistics on stderr
    with --verbose); returns 0.

    Raises:
        InputError: no prompt or an empty --file, a bad sampling option or --device.
        CheckpointError: see --model.
    """
    options.configure_inference(args)  # before torch is imported
    sampling = options.sampling_params(args)
    prompts = _prompts(args)
    options.setup_torch(args)
    model, tokenizer = options.load_model_and_tokenizer(args)
    from ..generation import generate, stream

    compile_s0 = _compile_seconds(model)
    if len(prompts) == 1 and args.file is None:
        s = stream(model, tokenizer, prompts[0], chat=args.chat, sampling=sampling)
        for piece in s:
            options.write(piece)
        options.write("\n")
        results = [s.result]
    else:
        results = generate(model, tokenizer, prompts, chat=args.chat, sampling=sampling)
        for i, (prompt, res) in enumerate(zip(prompts, results), 1):
            options.write(f"=== [{i}/{len(prompts)}] {_preview(prompt)} ===\n{res.text}\n\n")
    if args.verbose:
        r0 = results[0]
        n_prompt = sum(r.prompt_tokens for r in results)
        n_gen = sum(len(r.token_ids) + (r.stop_token_id is not None) for r in results)
        prefill_tps = n_prompt / r0.prefill_seconds if r0.prefill_seconds > 0 else float("inf")
        # Compiling the decode step (--compile) happens in the first steps: left out.
        compile_s = _compile_seconds(model) - compile_s0
        decode_s, n_timed = r0.decode_seconds, n_gen
        if compile_s > 0:
            decode_s, n_timed = decode_s - compile_s, n_gen - len(results)
        decode_tps = n_timed / decode_s if decode_s > 0 else float("inf")
        compiling = (
            f" (compiling the decode step: {compile_s:.1f} s, left out)" if compile_s else ""
        )
        print(
            f"prompt tokens: {n_prompt}, generated tokens: {n_gen}, "
            f"prefill: {prefill_tps:.1f} tok/s, decode: {decode_tps:.1f} tok/s{compiling}, "
            f"state: {model.state_nbytes(1)} bytes per sequence (batch {len(results)})",
            file=sys.stderr,
        )
        print(f"{options.inference_summary(args)}; sampling: {sampling}", file=sys.stderr)
        from .. import ops  # which kernel each op ran, and why (measured per machine)

        why = ops.describe(next(model.parameters()).device, why=True)
        print("kernels: " + "; ".join(f"{k}: {v}" for k, v in why.items()), file=sys.stderr)
    return 0
