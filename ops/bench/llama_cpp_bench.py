# Baseline (a) of `ferry bench inference`: single-stream llama.cpp decode speed via llama-cpp-python; prints one JSON line.
"""Benchmark llama.cpp (through llama-cpp-python) on a GGUF chat model.

Loads the model once, does one untimed warm-up generation, then ``--runs``
timed generations of the same chat request (greedy, temperature 0). Every
end-of-generation token is banned with a logit bias so each run generates
exactly ``--max-tokens`` tokens and tok/s figures are comparable.

stdout: exactly one JSON line. stderr: everything else.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

SYSTEM_PROMPT = "You are a helpful customer-service assistant. Answer briefly."
DEFAULT_PROMPT = "A customer asks: where is my order 1234? Answer briefly."
# A finite, very large negative bias: -inf would also work with this version, but
# a finite value keeps the logits free of inf/NaN arithmetic in any sampler.
EOG_BIAS = -1.0e9


def log(*args):
    print("[llama_cpp_bench]", *args, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="path to a GGUF model file")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per run")
    p.add_argument("--runs", type=int, default=3, help="timed runs (after one untimed warm-up)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    p.add_argument("--n-ctx", type=int, default=2048, help="context size")
    args = p.parse_args(argv)
    for name in ("max_tokens", "runs", "threads", "n_ctx"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def eog_token_ids(llm, llama_cpp):
    """All end-of-generation token ids (EOS, EOT, <|im_end|>, ...) of the model.

    llama-cpp-python stops on any token for which llama_vocab_is_eog() is true,
    so banning only token_eos() is not enough for chat models.
    """
    ids = set()
    eos = llm.token_eos()
    if eos is not None and eos >= 0:
        ids.add(int(eos))
    is_eog = getattr(llama_cpp, "llama_vocab_is_eog", None)
    vocab = getattr(getattr(llm, "_model", None), "vocab", None)
    if is_eog is not None and vocab is not None:
        for tok in range(llm.n_vocab()):
            if is_eog(vocab, tok):
                ids.add(tok)
    else:
        log("warning: llama_vocab_is_eog not available; banning token_eos() only")
    return sorted(ids)


def main(argv=None):
    args = parse_args(argv)

    if not os.path.isfile(args.model):
        print(f"error: model file not found: {args.model}", file=sys.stderr)
        return 2

    try:
        import llama_cpp
    except ImportError as e:
        print(f"error: cannot import llama_cpp ({e}); run ops/bench/setup-llama-cpp.sh", file=sys.stderr)
        return 3

    version = getattr(llama_cpp, "__version__", "unknown")
    log(f"llama-cpp-python {version}, model {args.model}, threads {args.threads}, n_ctx {args.n_ctx}")

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
        seed=0,
    )
    log(f"model loaded in {time.perf_counter() - t0:.2f}s, chat_format={llm.chat_format!r}")

    eog = eog_token_ids(llm, llama_cpp)
    log("banning end-of-generation tokens via logit_bias: "
        + ", ".join(f"{t}={llm._model.token_get_text(t)!r}" for t in eog))
    logit_bias = {t: EOG_BIAS for t in eog}

    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": args.prompt},
    ]

    def generate():
        start = time.perf_counter()
        resp = llm.create_chat_completion(
            messages=messages,
            temperature=0.0,
            max_tokens=args.max_tokens,
            logit_bias=logit_bias,
            seed=0,
        )
        seconds = time.perf_counter() - start
        return resp, seconds

    resp, seconds = generate()
    usage = resp.get("usage", {})
    choice = resp["choices"][0]
    log(f"warm-up: {usage.get('completion_tokens')} tokens in {seconds:.3f}s, "
        f"prompt_tokens={usage.get('prompt_tokens')}, finish_reason={choice.get('finish_reason')}")
    log("warm-up text: " + json.dumps(choice["message"].get("content", ""))[:400])

    runs = []
    for i in range(args.runs):
        # Start every run from an empty KV cache so each one pays the same prompt cost.
        llm.reset()
        resp, seconds = generate()
        tokens = int(resp["usage"]["completion_tokens"])
        finish = resp["choices"][0].get("finish_reason")
        tps = tokens / seconds if seconds > 0 else math.inf
        log(f"run {i + 1}/{args.runs}: {tokens} tokens in {seconds:.3f}s = {tps:.1f} tok/s "
            f"(finish_reason={finish})")
        if tokens != args.max_tokens:
            log(f"warning: run {i + 1} generated {tokens} tokens, not --max-tokens {args.max_tokens}")
        runs.append({"tokens": tokens, "seconds": round(seconds, 6), "tok_per_s": round(tps, 3)})

    result = {
        "engine": "llama.cpp",
        "version": version,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "runs": runs,
        "tok_per_s_median": round(statistics.median(r["tok_per_s"] for r in runs), 3),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
