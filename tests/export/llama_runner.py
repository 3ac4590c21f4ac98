"""Run llama.cpp (llama-cpp-python) on GGUF files in a separate process: ``python llama_runner.py jobs.json out.npz``.

A separate process because llama.cpp aborts (SIGABRT) on some malformed files; the test then sees a
failed subprocess instead of a dead pytest. Each job is one of

* ``{"kind": "logits", "model": path, "ids": [...], "lora": path|null}`` -> ``logits_<i>`` [n, vocab]
* ``{"kind": "tokenize", "model": path, "texts": [...]}`` -> ``tokens_<i>_<j>`` (special=True, no bos)
  and ``bos_<i>`` (the ids llama.cpp's default tokenize adds: add_bos from the file)

Exact path: F32 KV cache, no flash attention (see the notes: F16 KV / flash attention add ~1e-3).
"""

import json
import sys

import numpy as np


def main(jobs_path: str, out_path: str) -> None:
    import llama_cpp

    jobs = json.load(open(jobs_path))
    out = {}
    for i, job in enumerate(jobs):
        if job["kind"] == "logits":
            ids = job["ids"]
            kwargs = dict(model_path=job["model"], n_ctx=max(64, len(ids) + 8), n_batch=max(64, len(ids) + 8),
                          logits_all=True, type_k=0, type_v=0, verbose=False, n_threads=2, seed=0)
            if job.get("lora"):
                kwargs["lora_path"] = job["lora"]
            try:
                llm = llama_cpp.Llama(flash_attn=False, **kwargs)
            except TypeError:  # newer llama-cpp-python: flash_attn_type
                llm = llama_cpp.Llama(**kwargs)
            llm.eval(ids)
            out[f"logits_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
            del llm
        elif job["kind"] == "tokenize":
            llm = llama_cpp.Llama(model_path=job["model"], vocab_only=True, verbose=False)
            for j, text in enumerate(job["texts"]):
                out[f"tokens_{i}_{j}"] = np.array(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True), dtype=np.int64)
            out[f"bos_{i}"] = np.array(llm.tokenize(b"hello world", add_bos=True, special=False), dtype=np.int64)
            out[f"detok_{i}"] = np.frombuffer(llm.detokenize(out[f"tokens_{i}_0"].tolist()), dtype=np.uint8)
            del llm
        else:
            raise ValueError(job["kind"])
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
