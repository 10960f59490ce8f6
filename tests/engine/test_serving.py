"""The serving loop (`runrl_engine/serving.py`) on the builtin tiny model: requests that join a running batch get
exactly what the rollout loop gives each alone (same seeds, same tokens), per-request sampling settings, stop
strings cut before the match (also across streamed pieces), `n` choices, the batch-size cap, cancellation, a model
whose cache cannot be merged, and an adapter-only `final/` loaded on its base (also when the recorded base is gone)."""

from __future__ import annotations

import json
import queue
import shutil
import time

import pytest
import torch

from runrl_engine.checkpoint import export_final
from runrl_engine.rollout.hf import generate
from runrl_engine.rollout.types import SamplingParams
from runrl_engine.serving import Batcher, Event, Job, Sampling, adapter_base, load_for_serving


def wait_all(events: queue.Queue[Event], n: int, timeout: float | None = None) -> tuple[list[str], list[Event]]:
    """Block until `n` choices have finished; their texts and final events."""
    texts, finals, deadline = [""] * n, [None] * n, None if timeout is None else time.time() + timeout
    while any(f is None for f in finals):
        ev = events.get(timeout=None if deadline is None else max(0.0, deadline - time.time()))
        if ev.finish == "error":
            raise RuntimeError(ev.delta)
        texts[ev.index] += ev.delta
        if ev.finish is not None:
            finals[ev.index] = ev
    return texts, finals  # type: ignore[return-value]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_serving(tiny_model_dir)


def encode(tok, text):
    msgs = [{"role": "user", "content": text}]
    return tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


def alone(loaded, prompt, sampling: Sampling, seed: int) -> str:
    """What the rollout loop samples for `prompt` by itself, as text (stop token dropped)."""
    params = SamplingParams(max_new_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p)
    tokens = generate(loaded.model, [prompt], num_samples=1, seeds=[seed], params=params, stop_ids=loaded.stop_ids,
                      pad_id=loaded.tokenizer.pad_token_id)[0].tokens
    return loaded.tokenizer.decode([t for t in tokens if t not in loaded.stop_ids], skip_special_tokens=True)


def serve(batcher, prompt, sampling, n=1):
    events: queue.Queue[Event] = queue.Queue()
    job = Job(prompt=prompt, sampling=sampling, on_event=events.put, n=n)
    batcher.submit(job)
    return job, events


@pytest.fixture
def batcher(loaded):
    b = Batcher(loaded, max_batch_size=8)
    b.start()
    yield b
    b.close()


def test_requests_joining_a_running_batch_get_what_each_gets_alone(loaded, batcher):
    tok = loaded.tokenizer
    prompts = [encode(tok, "hi"), encode(tok, "a much longer prompt with many more words in it"),
               encode(tok, "count to three"), encode(tok, "x " * 30)]
    sampling = [Sampling(max_tokens=40, temperature=0.9, top_p=0.95, seed=7), Sampling(max_tokens=25, seed=8),
                Sampling(max_tokens=40, temperature=0), Sampling(max_tokens=33, temperature=1.3, top_p=0.5, seed=9)]
    queues: list[queue.Queue] = []
    seen = [0]

    def join_next(event: Event) -> None:  # on the batcher thread: the next request arrives mid-decode
        seen[0] += 1
        if len(queues) < len(prompts) - 1 and seen[0] % 3 == 0:
            k = len(queues) + 1
            queues.append(serve(batcher, prompts[k], sampling[k])[1])
        first.put(event)

    first: queue.Queue[Event] = queue.Queue()
    batcher.submit(Job(prompt=prompts[0], sampling=sampling[0], on_event=join_next))
    texts, finals = wait_all(first, 1, timeout=60)
    results = [(texts, finals)] + [wait_all(q, 1, timeout=60) for q in queues]
    assert len(results) == 4
    for k, (texts, finals) in enumerate(results):
        seed = sampling[k].seed if sampling[k].seed is not None else 0
        assert texts[0] == alone(loaded, prompts[k], sampling[k], seed), k
        assert finals[0].finish == "length" and finals[0].tokens == sampling[k].max_tokens  # random weights: no EOS
    stats = batcher.stats()
    assert stats["peak_batch_size"] >= 3 and stats["running"] == 0 and stats["requests"] == 4
    assert stats["completion_tokens"] == sum(s.max_tokens for s in sampling)


def test_seed_fixes_the_draws_and_n_choices_follow_consecutive_seeds(loaded, batcher):
    prompt = encode(loaded.tokenizer, "hello there")
    s = Sampling(max_tokens=20, temperature=1.0, seed=41)
    one = wait_all(serve(batcher, prompt, s)[1], 1, timeout=60)[0][0]
    assert one == wait_all(serve(batcher, prompt, s)[1], 1, timeout=60)[0][0]
    three, finals = wait_all(serve(batcher, prompt, s, n=3)[1], 3, timeout=60)
    assert three[0] == one and len(set(three)) == 3  # choice i draws from seed 41 + i
    assert three[1] == alone(loaded, prompt, s, 42) and [f.index for f in finals] == [0, 1, 2]
    # top_p 0 keeps only the most likely token: sampling at any temperature is then greedy
    greedy = wait_all(serve(batcher, prompt, Sampling(max_tokens=20, temperature=0))[1], 1, timeout=60)[0][0]
    top0 = wait_all(serve(batcher, prompt, Sampling(max_tokens=20, temperature=1.5, top_p=0.0))[1], 1, 60)[0][0]
    assert top0 == greedy != one


def test_stop_strings_end_the_text_before_the_match_even_across_pieces(loaded, batcher):
    prompt = encode(loaded.tokenizer, "say something long")
    base = Sampling(max_tokens=60, temperature=1.0, seed=3)
    full = wait_all(serve(batcher, prompt, base)[1], 1, timeout=60)[0][0]
    stop = full[20:24]
    assert len(stop) == 4 and stop.strip()
    _, events = serve(batcher, prompt, Sampling(max_tokens=60, temperature=1.0, seed=3, stop=("never seen", stop)))
    pieces = []
    while True:
        ev = events.get(timeout=60)
        pieces.append(ev.delta)
        if ev.finish:
            break
    text = "".join(pieces)
    assert text == full[:full.find(stop)] and ev.finish == "stop" and ev.tokens < 60
    assert not any(stop[:2] in p for p in pieces[-1:]) or text.endswith(pieces[-1])  # nothing past the cut was sent
    # a stop string at the very start: empty text, finish "stop"
    texts, finals = wait_all(serve(batcher, prompt, Sampling(max_tokens=60, temperature=1.0, seed=3,
                                                             stop=(full[:3],)))[1], 1, timeout=60)
    assert texts == [""] and finals[0].finish == "stop"


def test_max_tokens_and_the_batch_cap(loaded):
    b = Batcher(loaded, max_batch_size=2)
    b.start()
    try:
        prompt = encode(loaded.tokenizer, "go")
        jobs = [serve(b, prompt, Sampling(max_tokens=3 + k, temperature=0)) for k in range(3)]
        for k, (_, events) in enumerate(jobs):
            _, finals = wait_all(events, 1, timeout=60)
            assert finals[0].finish == "length" and finals[0].tokens == 3 + k
        assert b.stats()["peak_batch_size"] == 2 and set(b.stats()["batch_steps"]) <= {"1", "2"}
        with pytest.raises(ValueError, match="n must be"):
            b.submit(Job(prompt=prompt, sampling=Sampling(max_tokens=2), on_event=print, n=3))
    finally:
        b.close()


def test_a_cancelled_request_leaves_the_batch(loaded, batcher):
    prompt = encode(loaded.tokenizer, "go on")
    job, events = serve(batcher, prompt, Sampling(max_tokens=1500, temperature=1.0, seed=1))
    events.get(timeout=60)
    job.cancel()
    other = wait_all(serve(batcher, prompt, Sampling(max_tokens=5, temperature=0))[1], 1, timeout=60)[1][0]
    assert other.finish == "length"
    assert batcher.stats()["running"] == 0 and batcher.stats()["completion_tokens"] < 1500


def test_a_model_whose_cache_cannot_be_merged_is_served_a_batch_at_a_time(tiny_model_dir, loaded):
    """Sliding-window layers keep transformers' own cache layers: no joining mid-batch, same greedy tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir, use_sliding_window=True, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    sliding = type(loaded)(model=model, tokenizer=loaded.tokenizer, device="cpu", dtype=torch.float32,
                           context=2048, stop_ids=loaded.stop_ids)
    b = Batcher(sliding, max_batch_size=4)
    b.start()
    try:
        prompts = [encode(loaded.tokenizer, "one"), encode(loaded.tokenizer, "a second and longer one")]
        jobs = [serve(b, p, Sampling(max_tokens=24, temperature=0)) for p in prompts]
        for p, (_, events) in zip(prompts, jobs):
            out = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=loaded.tokenizer.pad_token_id, eos_token_id=sorted(loaded.stop_ids))
            want = loaded.tokenizer.decode(out[0, len(p):], skip_special_tokens=True)
            assert wait_all(events, 1, timeout=60)[0][0] == want
        assert b.stats()["joins_running_batch"] is False
    finally:
        b.close()


def test_an_adapter_only_final_is_served_on_its_base(tmp_path, tiny_model_dir, loaded):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    final = export_final(lora, loaded.tokenizer, tmp_path / "run", merge_lora=False)
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    assert adapter_base(final) == str(tiny_model_dir) and adapter_base(tmp_path) is None
    served = load_for_serving(final)
    prompt = encode(loaded.tokenizer, "hi")
    sampling = Sampling(max_tokens=16, temperature=0)
    merged = alone(served, prompt, sampling, 0)
    with torch.no_grad():
        out = lora.eval().generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                   eos_token_id=sorted(loaded.stop_ids), pad_token_id=loaded.tokenizer.pad_token_id)
    assert merged == loaded.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    assert merged != alone(loaded, prompt, sampling, 0)  # the adapter changes the answer
    assert served.base_model == str(tiny_model_dir)
    # the recorded base is gone (another machine, a cleared cache): the run's model id is loaded instead
    config = json.loads((final / "adapter_config.json").read_text())
    (final / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/tiny"}))
    assert adapter_base(final, "builtin:tiny") == "builtin:tiny"
    again = load_for_serving(final, "builtin:tiny")
    assert again.base_model == "builtin:tiny" and alone(again, prompt, sampling, 0) == merged
    shutil.rmtree(final)
