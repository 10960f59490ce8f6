"""Ours vs TRL 1.16's `GRPOTrainer` on one GPU: generation tokens/s, training tokens/s, step time, bf16.

    python benchmarks/gpu_bench.py                                # both models, every side available
    python benchmarks/gpu_bench.py --models qwen2.5-0.5b --sides ours-hf,trl --steps 4
    python benchmarks/gpu_bench.py --smoke                        # CPU, a toy model, 2 steps (tests run this)

Written for the project's device machine (one H200, no model hub): the models are random-init Qwen2.5-0.5B and
Qwen3-1.7B built here from configs with the real sizes (`MODELS`), saved once under `--work-dir`. Random weights
cost the same FLOPs as trained ones; their completions are noise, so nearly all run to `completion_length`
(the end-of-turn token has probability ~1/151936), which makes both sides generate the same number of tokens.

Tokenizer: the builtin tiny tokenizer (`runrl_engine.tiny`, 512 ids, ChatML template) with the models' real
vocab size (151936) kept in their configs, so the LM head, the sampler and the log-softmax cost what they cost
for the real models. Ids >= 512 decode to nothing, so rewards are mostly 0: fine for speed, meaningless for
learning (this is not a learning check).

Sides, each in its own subprocess (its own CUDA context and peak-memory counter), one after another:
`ours-hf` (our trainer, `rollout_backend: hf`), `ours-paged` (`rollout_backend: paged`), `ours-vllm` (only when
vllm is importable), `trl`. Same settings on all: fp32 master weights with bf16 autocast (ours `dtype: bfloat16`,
TRL `bf16=True` with fp32 loading), SDPA attention, no gradient checkpointing, full fine-tuning, the same
prompts, reward, seed, `loss_type=dapo`, temperature 1, top_p 1, top_k off, constant LR, beta 0; one optimizer
step = 8 prompts x 8 generations in micro-batches of 16 (TRL: `per_device_train_batch_size=16`,
`gradient_accumulation_steps=4`).

Measured per step (the first excluded, medians reported): step time = interval between optimizer-step ends;
generation tokens/s = completion tokens / generation time (ours: `time/rollout_s`, which for vLLM includes
waking it and pushing the weights; TRL: its `_generate`); training tokens/s = (prompt + completion tokens) /
update time (ours: `time/update_s`; TRL: step time minus `_generate_and_score_completions`), with prompt tokens
counted as the mean prompt length x sequences on both sides; peak VRAM = `torch.cuda.max_memory_allocated`.
Ours skips the final model export (`_finish`): it is not part of a step.

The last line printed is one JSON object: per model, each side's medians and the ratios ours/TRL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path (the smoke tests)
from trl_timing import intervals, time_trl_training  # noqa: E402

# real sizes (from the models' published config.json); vocab kept, tokenizer is the tiny one (see above)
MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "qwen3-1.7b": dict(arch="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    # --smoke: the same build path at toy size, vocab = the tiny tokenizer's
    "smoke": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True),
}
SIDES = ("ours-hf", "ours-paged", "ours-vllm", "trl")
WORDS = ("apple banana cherry data alpha gamma zebra mango papaya river stone candle garden paper "
         "lamp orange violet salad pasta camera atlas drama karma llama plant table water yellow").split()
REWARD_SOURCE = '''
def reward_fn(completion, **row):
    """Fraction of the completion's characters that are the letter `a`."""
    return completion.count("a") / len(completion) if completion else 0.0
'''
WORKLOAD = dict(prompts_per_step=8, num_generations=8, micro_batch=16, completion_length=256, learning_rate=1e-6,
                steps=5, seed=0)
SMOKE_WORKLOAD = dict(WORKLOAD, prompts_per_step=2, num_generations=4, micro_batch=4, completion_length=8, steps=2)


# ---- inputs -------------------------------------------------------------------------------------------------

def make_config(name: str, *, eos_id: int, pad_id: int) -> tuple[Any, Any]:
    """(transformers config, model class) of `MODELS[name]`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    spec = dict(MODELS[name])
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[spec.pop("arch")]
    return config_cls(**spec, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, dtype="bfloat16"), model_cls


def build_model(name: str, root: Path, device: str) -> Path:
    """Random-init model `name` + the tiny tokenizer in `root/name` (built once; a stamp marks a finished build)."""
    out = root / name
    if (out / "bench_model.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer

    from runrl_engine.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(build_tiny_model("tiny"))
    config, model_cls = make_config(name, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.7 B parameters on the GPU takes seconds, on CPU much longer
        model = model_cls(config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    model.to(torch.bfloat16).save_pretrained(tmp)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    (tmp / "bench_model.json").write_text(json.dumps({"name": name, "params": n_params, **MODELS[name]}))
    del model
    tmp.rename(out)
    return out


def write_inputs(work: Path, n: int = 64) -> tuple[Path, Path]:
    rng = random.Random(0)
    prompt_file, reward_file = work / "prompts.jsonl", work / "reward.py"
    with prompt_file.open("w") as f:
        for _ in range(n):
            text = "Count the letters: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            f.write(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n")
    reward_file.write_text(REWARD_SOURCE)
    return prompt_file, reward_file


def mean_prompt_tokens(model_dir: Path, prompt_file: Path) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line)["prompt"] for line in prompt_file.read_text().splitlines()]
    lens = [len(tok(tok.apply_chat_template(r, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"]) for r in rows]
    return sum(lens) / len(lens)


def _cuda_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ---- one side (in a worker subprocess, or in-process with --smoke) -----------------------------------------

def run_ours(backend: str, model_dir: Path, work: Path, wl: dict[str, Any], device: str) -> dict[str, Any]:
    from runrl_engine.config import RunConfig
    from runrl_engine.setup import build_run
    from runrl_engine.trainer import Trainer

    prompt_file, reward_file = write_inputs(work)
    n_seq = wl["prompts_per_step"] * wl["num_generations"]
    cfg = RunConfig.from_dict({
        "model": str(model_dir), "prompt_file": str(prompt_file), "reward_file": str(reward_file),
        "completion_length": wl["completion_length"], "max_steps": wl["steps"],
        "prompts_per_step": wl["prompts_per_step"], "num_generations": wl["num_generations"],
        "micro_batch_size": wl["micro_batch"], "learning_rate": wl["learning_rate"], "beta": 0.0,
        "loss_type": "dapo", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": wl["seed"], "eval_every": 0,
        "eval_fraction": 0.0, "save_every": 0, "log_completions": 0, "reward_workers": 2, "device": device,
        "dtype": "bfloat16" if device == "cuda" else "float32", "attn_implementation": "sdpa",
        "gradient_checkpointing": False, "lr_scheduler": "constant", "max_grad_norm": 1.0,
        "rollout_backend": backend, "max_prompt_length": 512,
    })
    trainer = Trainer(build_run(cfg, work / "run"))
    trainer._finish = lambda **_: None  # no final export: not part of a training step
    ends: list[float] = []
    emit = trainer.outputs.metrics

    def metrics(record: dict[str, Any]) -> None:
        ends.append(time.perf_counter())
        emit(record)

    trainer.outputs.metrics = metrics
    t0 = time.perf_counter()
    hist = trainer.run().history
    return {"step_s": intervals(t0, ends), "completion_tokens": [r["completion_length_mean"] * n_seq for r in hist],
            "gen_s": [r["time/rollout_s"] for r in hist], "update_s": [r["time/update_s"] for r in hist],
            # the trainer resets the CUDA peak at every step's record: the run's peak is the largest step's
            "peak_vram_mb": max((r["peak_vram_mb"] for r in hist if "peak_vram_mb" in r), default=None)}


def run_trl(model_dir: Path, work: Path, wl: dict[str, Any], device: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    prompt_file, reward_file = write_inputs(work)
    namespace: dict[str, Any] = {}
    exec(compile(reward_file.read_text(), str(reward_file), "exec"), namespace)
    reward_fn = namespace["reward_fn"]

    def reward(prompts, completions, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(reward_fn(t)) for t in texts]

    reward.__name__ = "reward_fn"
    n_seq = wl["prompts_per_step"] * wl["num_generations"]
    cuda = device == "cuda"
    args = GRPOConfig(
        output_dir=str(work / "trl-run"), max_steps=wl["steps"], learning_rate=wl["learning_rate"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.0,
        loss_type="dapo", epsilon=0.2, num_generations=wl["num_generations"],
        per_device_train_batch_size=wl["micro_batch"], gradient_accumulation_steps=n_seq // wl["micro_batch"],
        num_iterations=1, max_completion_length=wl["completion_length"], temperature=1.0, top_p=1.0, top_k=0,
        bf16=cuda, fp16=False, activation_checkpointing=False, use_cpu=not cuda, use_vllm=False, report_to=[],
        logging_steps=1, save_strategy="no", seed=wl["seed"], disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False, model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list([json.loads(x) for x in prompt_file.read_text().splitlines()]),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    assert not trainer.args.gradient_checkpointing
    timing = time_trl_training(trainer, {"generate": "_generate", "gen_and_score": "_generate_and_score_completions"},
                               log_key="completions/mean_length", sync=torch.cuda.synchronize if cuda else None)
    step_s, t = timing["step_s"], timing["phases"]
    return {"step_s": step_s, "completion_tokens": [lg["completions/mean_length"] * n_seq for lg in timing["logs"]],
            "gen_s": t["generate"], "update_s": [total - gs for total, gs in zip(step_s, t["gen_and_score"])],
            "peak_vram_mb": _cuda_peak_mb()}


def run_side(side: str, model: str, root: Path, work: Path, wl: dict[str, Any], device: str) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(model, root, device)
    prompt_tokens = mean_prompt_tokens(model_dir, write_inputs(work)[0])
    t0 = time.perf_counter()
    raw = run_trl(model_dir, work, wl, device) if side == "trl" else \
        run_ours(side.removeprefix("ours-"), model_dir, work, wl, device)
    raw.update(side=side, model=model, wall_s=time.perf_counter() - t0, mean_prompt_tokens=prompt_tokens,
               n_seq=wl["prompts_per_step"] * wl["num_generations"])
    return raw


# ---- the parent ---------------------------------------------------------------------------------------------

def spawn(side: str, model: str, root: Path, wl: dict[str, Any], device: str, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"gpu-bench-{side}-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", side, "--models", model, "--work-dir", str(root),
               "--run-dir", tmp, "--result", str(result), "--workload-json", json.dumps(wl), "--device", device]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return {"side": side, "model": model, "error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not result.is_file():
            return {"side": side, "model": model, "error": f"exit {proc.returncode}: {proc.stderr[-2500:]}"}
        return json.loads(result.read_text())


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    if "error" in raw:
        return {"error": raw["error"]}
    s = 1 if len(raw["step_s"]) > 1 else 0  # the first step warms up
    prompt = raw["mean_prompt_tokens"] * raw["n_seq"]
    gen = [c / g for c, g in zip(raw["completion_tokens"][s:], raw["gen_s"][s:]) if g > 0]
    train = [(prompt + c) / u for c, u in zip(raw["completion_tokens"][s:], raw["update_s"][s:]) if u > 0]
    return {"step_s": statistics.median(raw["step_s"][s:]), "gen_tok_s": statistics.median(gen) if gen else None,
            "train_tok_s": statistics.median(train) if train else None,
            "completion_tokens": statistics.median(raw["completion_tokens"][s:]),
            "peak_vram_mb": raw.get("peak_vram_mb"), "wall_s": raw.get("wall_s")}


def ratios(res: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    t = res.get("trl", {})
    for side, r in res.items():
        if side == "trl" or "error" in r or "error" in t or not t:
            continue
        short = side.removeprefix("ours-")
        out[f"{short}/trl_step"] = r["step_s"] / t["step_s"]
        for k in ("gen_tok_s", "train_tok_s"):
            if r.get(k) and t.get(k):
                out[f"{short}/trl_{k}"] = r[k] / t[k]
    return out


def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers
    import trl

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "device": device,
            "vllm": _vllm_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _vllm_version() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    from importlib.metadata import version

    return version("vllm")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen2.5-0.5b,qwen3-1.7b", help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ", ".join(SIDES))
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {WORKLOAD['steps']})")
    p.add_argument("--completion-length", type=int, default=None,
                   help=f"max completion tokens (default {WORKLOAD['completion_length']})")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--timeout", type=float, default=300, help="seconds per side run")
    p.add_argument("--work-dir", type=Path, default=None, help="where models are built (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="CPU, toy model, 2 steps, in-process (the smoke test)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workload-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        raw = run_side(a.worker, a.models, a.work_dir, a.run_dir, json.loads(a.workload_json), a.device)
        a.result.write_text(json.dumps(raw))
        return 0

    import torch

    device = a.device or ("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    wl = dict(SMOKE_WORKLOAD if a.smoke else WORKLOAD)
    if a.steps:
        wl["steps"] = a.steps
    if a.completion_length:
        wl["completion_length"] = a.completion_length
    models = ["smoke"] if a.smoke else [m.strip() for m in a.models.split(",")]
    sides = [s.strip() for s in a.sides.split(",")]
    for bad in [m for m in models if m not in MODELS] + [s for s in sides if s not in SIDES]:
        p.error(f"unknown model or side {bad!r}")
    if "ours-vllm" in sides and (device != "cuda" or _vllm_version() is None):
        print("skipping ours-vllm: " + ("vllm is not installed" if _vllm_version() is None else "no CUDA device"))
        sides.remove("ours-vllm")
    root = a.work_dir or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    print(f"{info}\nworkload {wl}")
    results: dict[str, dict[str, Any]] = {}
    for model in models:
        results[model] = {}
        for side in sides:
            if a.smoke:  # in-process: seconds instead of one interpreter start per side
                try:
                    raw = run_side(side, model, root, root / f"run-{model}-{side}", wl, device)
                except Exception as exc:  # noqa: BLE001 - reported per side, the others still run
                    raw = {"error": f"{type(exc).__name__}: {exc}"}
            else:
                raw = spawn(side, model, root, wl, device, a.timeout)
            results[model][side] = summarize(raw)
            r = results[model][side]
            status = r["error"].splitlines()[-1][:300] if "error" in r else \
                f"step {r['step_s']:.3f} s, gen {r['gen_tok_s'] or 0:.0f} tok/s, train {r['train_tok_s'] or 0:.0f} " \
                f"tok/s, peak VRAM {r['peak_vram_mb'] or 0:.0f} MB"
            print(f"[{model}] {side}: {status}", flush=True)
        results[model]["ratios"] = ratios({s: results[model][s] for s in sides})
        for k, v in results[model]["ratios"].items():
            print(f"[{model}] ratio {k} = {v:.3f}")
    print(json.dumps({"gpu_bench": {"info": info, "workload": wl, "results": results}}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
