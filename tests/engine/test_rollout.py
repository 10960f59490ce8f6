import time

import pytest
import torch
from transformers.cache_utils import DynamicCache

from runrl_engine.batch import RolloutBatch, pad_left, pad_right
from runrl_engine.rollout import hf
from runrl_engine.rollout.cpu_decode import LlamaDecodeStep
from runrl_engine.rollout.hf import filter_logits, generate
from runrl_engine.rollout.kv_cache import decode_cache
from runrl_engine.rollout.types import SamplingParams


def encode(tok, text):
    msgs = [{"role": "user", "content": text}]
    return tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]


def run(model, tok, prompts, seeds, n=2, max_new=12):
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0)
    return generate(model, prompts, num_samples=n, seeds=seeds, params=params, stop_ids={tok.eos_token_id},
                    pad_id=tok.pad_token_id)


def test_samples_depend_on_their_seed_not_on_the_batch(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    short, long = encode(tok, "hi"), encode(tok, "a much longer prompt with many more words in it")
    alone = run(model, tok, [short], [11, 12])
    together = run(model, tok, [long, short], [21, 22, 11, 12])
    assert [c.tokens for c in together[2:]] == [c.tokens for c in alone]
    again = run(model, tok, [short], [11, 12])
    assert [c.tokens for c in again] == [c.tokens for c in alone]
    other = run(model, tok, [short], [13, 14])
    assert [c.tokens for c in other] != [c.tokens for c in alone]


def test_stop_token_ends_a_sample_and_is_kept(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompt = encode(tok, "hello")
    comps = generate(model, [prompt], num_samples=8, seeds=list(range(8)),
                     params=SamplingParams(max_new_tokens=40), stop_ids=set(range(512)) - {0}, pad_id=tok.pad_token_id)
    # every token but id 0 stops: each sample ends at its first non-0 token
    for c in comps:
        assert c.finished == (c.tokens[-1] != 0) and all(t == 0 for t in c.tokens[:-1])


def test_training_forward_matches_unpadded_per_row_logps(tiny_model_and_tokenizer):
    """Left-padded prompts + right-padded completions give each row the log-probs it has alone."""
    model, tok = tiny_model_and_tokenizer
    prompts = [encode(tok, "x"), encode(tok, "a longer prompt here")]
    comps = [[5, 6, 7, 8, 9], [10, 11]]
    p_ids, p_mask = pad_left(prompts, tok.pad_token_id)
    batch = RolloutBatch(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=pad_right(comps, tok.pad_token_id),
                         completion_mask=pad_right([[1] * len(c) for c in comps], 0),
                         loss_mask=pad_right([[1.0] * len(c) for c in comps], 0.0, torch.float32),
                         advantages=torch.zeros(2), rewards=torch.zeros(2))
    with torch.no_grad():
        C = batch.completion_ids.shape[1]
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, logits_to_keep=C + 1).logits[:, :-1]
        batched = torch.log_softmax(logits.float(), -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            ids = torch.tensor([p + c])
            alone = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
            expected = alone.gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(batched[i, : len(c)], expected, atol=1e-5, rtol=1e-5)


def test_micro_batches_trim_padding_and_cover_every_row():
    p_ids, p_mask = pad_left([[1], [1, 2, 3], [1, 2]], 0)
    comps = [[4, 4, 4, 4], [5], [6, 6]]
    batch = RolloutBatch(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=pad_right(comps, 0),
                         completion_mask=pad_right([[1] * len(c) for c in comps], 0),
                         loss_mask=pad_right([[1.0] * len(c) for c in comps], 0.0, torch.float32),
                         advantages=torch.tensor([1.0, 2.0, 3.0]), rewards=torch.zeros(3))
    mbs = batch.micro_batches(2)
    assert sorted(a for mb in mbs for a in mb.advantages.tolist()) == [1.0, 2.0, 3.0]
    last = mbs[-1]  # the shortest row alone: no padding left
    assert last.prompt_ids.shape[1] == int(last.prompt_mask.sum()) and last.completion_mask.all()


def test_top_p_and_top_k_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, SamplingParams(max_new_tokens=1, top_p=0.7)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, SamplingParams(max_new_tokens=1, top_k=3)).isfinite()
    assert kept.tolist() == [[True, True, True, False]]


# ---- the decode loop's fast paths against the model's own forward ------------------------------------------

def _generate_all(model, tok, prompts, seeds, n, max_new, stop_ids=None):
    params = SamplingParams(max_new_tokens=max_new)
    return generate(model, prompts, num_samples=n, seeds=seeds, params=params,
                    stop_ids={tok.eos_token_id} if stop_ids is None else stop_ids, pad_id=tok.pad_token_id)


def _lora_tiny(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # peft initialises B = 0 (a no-op adapter); make the adapter change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def test_fast_decode_step_matches_the_model_forward(tiny_model_and_tokenizer, tiny_model_dir, monkeypatch):
    """Same tokens from `LlamaDecodeStep` as from the transformers forward on the same cache, and from transformers'
    own `DynamicCache`: with and without left padding, and under LoRA (adapter folded into the weights)."""
    model, tok = tiny_model_and_tokenizer
    lora = _lora_tiny(tiny_model_dir)
    prompt_sets = [[encode(tok, "hi")], [encode(tok, "x"), encode(tok, "a longer prompt with padding")]]
    cases = [(m, ps) for m in (model, lora) for ps in prompt_sets]
    fast = [_generate_all(m, tok, ps, list(range(3 * len(ps))), 3, 24) for m, ps in cases]
    assert all(LlamaDecodeStep.build(m, decode_cache(m, 8)) is not None for m in (model, lora))

    monkeypatch.setattr(LlamaDecodeStep, "build", classmethod(lambda cls, *a: None))
    slow = [_generate_all(m, tok, ps, list(range(3 * len(ps))), 3, 24) for m, ps in cases]
    # `generate` looks its cache builder up in rollout/hf.py's namespace
    monkeypatch.setattr(hf, "decode_cache", lambda model, capacity: DynamicCache(config=model.config))
    dynamic = [_generate_all(m, tok, ps, list(range(3 * len(ps))), 3, 24) for m, ps in cases]
    for f, s, d in zip(fast, slow, dynamic):
        assert [c.tokens for c in f] == [c.tokens for c in s] == [c.tokens for c in d]
        assert [c.finished for c in f] == [c.finished for c in s]
    # the adapter mattered: LoRA changed what was sampled
    assert [c.tokens for c in fast[2]] != [c.tokens for c in fast[0]]


def test_fast_decode_step_logits_equal_a_full_forward(tiny_model_dir):
    """Logits of one decode step after a left-padded prefill equal those of a full forward over the same tokens."""
    lora = _lora_tiny(tiny_model_dir)
    with torch.inference_mode():
        ids, mask, pos, cache = _prefilled(lora, [[5, 6, 7, 8, 9, 10], [11, 12]], 2)
        step = LlamaDecodeStep.build(lora, cache)
        nxt = torch.tensor([[20], [21]])
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        logits = step(nxt, pos[:, -1:] + 1, cache, full_mask)
        expected = _last_logits(lora, torch.cat([ids, nxt], 1), full_mask)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def _prefilled(model, prompts, new_tokens):
    """Left-padded prompts prefilled into a decode cache with room for `new_tokens` more: (ids, mask, pos, cache)."""
    ids, mask = pad_left(prompts, 0)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = decode_cache(model, ids.shape[1] + new_tokens)
    model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    return ids, mask, pos, cache


def _last_logits(model, ids, mask):
    """A full forward's logits at the last position, position ids following the mask (as the decode loop's)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]


def test_shared_prompt_keys_give_the_full_forwards_logits(tiny_model_dir):
    """With each prompt's keys and values held once (`SharedPromptKVLayer`: a left-padded prompt, 3 samples each),
    a decode step's logits equal a full forward over the same tokens, also after rows were dropped."""
    from runrl_engine.rollout.kv_cache import SharedPromptKVLayer, share_prompts

    lora = _lora_tiny(tiny_model_dir)
    samples = 3
    with torch.inference_mode():
        ids, mask, pos, cache = _prefilled(lora, [[5, 6, 7, 8, 9, 10], [11, 12]], 4)
        step = LlamaDecodeStep.build(lora, cache)
        share_prompts(cache, samples, 4, mask)
        assert all(type(layer) is SharedPromptKVLayer for layer in cache.layers)
        assert LlamaDecodeStep.build(lora, cache) is not None
        rows = ids.repeat_interleave(samples, 0)
        row_mask, row_pos = mask.repeat_interleave(samples, 0), pos[:, -1:].repeat_interleave(samples, 0)
        fed = torch.empty(len(rows), 0, dtype=torch.long)
        kept = torch.arange(len(rows))
        for t, drop in enumerate([None, torch.tensor([0, 1, 2, 4]), None]):  # then rows 3 and 5 go
            if drop is not None:
                cache.batch_select_indices(drop)
                kept, fed, row_pos = kept[drop], fed[drop], row_pos[drop]
            nxt = 20 + t + torch.arange(len(kept)).unsqueeze(1)  # a different token per row
            fed, row_pos = torch.cat([fed, nxt], 1), row_pos + 1
            logits = step(nxt, row_pos, cache, None)
            full_mask = torch.cat([row_mask[kept], torch.ones_like(fed)], 1)
            expected = _last_logits(lora, torch.cat([rows[kept], fed], 1), full_mask)
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_generate_with_shared_prompt_keys_samples_what_the_model_forward_samples(tiny_model_and_tokenizer,
                                                                                 monkeypatch):
    """`generate` holds prompt keys once where `prompt_sharing_pays` (forced here: the tiny model saves little):
    the same tokens as the transformers forward, rows stopping at different steps."""
    from runrl_engine.rollout import cpu_decode

    model, tok = tiny_model_and_tokenizer
    prompts = [encode(tok, "x"), encode(tok, "a longer prompt with padding")]
    assert not cpu_decode.prompt_sharing_pays(model.config, 2, 8, 8)
    monkeypatch.setattr(cpu_decode, "SHARE_MIN_SAVED_BYTES", 0)
    assert cpu_decode.prompt_sharing_pays(model.config, 2, 8, 8)
    stops = set(range(3, 512, 23))  # a few dozen stop tokens: rows end at different steps
    shared = _generate_all(model, tok, prompts, list(range(8)), 4, 24, stops)
    monkeypatch.setattr(LlamaDecodeStep, "build", classmethod(lambda cls, *a: None))
    plain = _generate_all(model, tok, prompts, list(range(8)), 4, 24, stops)
    assert [c.tokens for c in shared] == [c.tokens for c in plain]
    assert len({len(c.tokens) for c in plain}) > 1  # rows finished at different steps


def test_uniforms_are_each_generators_own_sequence():
    g = torch.Generator().manual_seed(7)
    one_at_a_time = torch.cat([torch.rand(1, generator=g) for _ in range(5)])
    u = hf.draw_uniforms([3, 7], 5)
    assert u.shape == (2, 5) and torch.equal(u[1], one_at_a_time)


def test_a_stop_token_at_the_last_step_finishes_the_completion(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    every_but_0 = set(range(512)) - {0}
    for max_new in (1, 2):
        comps = _generate_all(model, tok, [encode(tok, "hello")], list(range(16)), 16, max_new, every_but_0)
        for c in comps:
            assert 1 <= len(c.tokens) <= max_new
            assert c.finished == (c.tokens[-1] != 0)
        assert any(c.finished for c in comps)


@pytest.mark.parametrize("kernel_name", ["mkl", "onednn"])
def test_one_packing_serves_every_smaller_row_count(kernel_name, monkeypatch):
    """`PackedProjections` packs once for the first step's rows; as rows finish, the same packing gives `F.linear`'s
    result (to rounding) with no repacking and no padding rows; a larger batch (serving's) repacks. For each
    library's packed kernel."""
    from runrl_engine.rollout import cpu_decode
    from runrl_engine.rollout.cpu_decode import PackedProjections

    kernel = next(k for k in cpu_decode.KERNELS if k.name == kernel_name)
    if not cpu_decode._reuse_holds(kernel):
        pytest.skip(f"no {kernel_name} packed linear here, or its packing does not serve fewer rows")
    monkeypatch.setattr(cpu_decode, "packed_kernel", lambda weight_bytes: kernel)
    gen = torch.Generator().manual_seed(0)
    linears = [(torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)),
               (torch.randn(64, 96, generator=gen), None)]
    packed = PackedProjections(linears)
    assert packed.enabled and packed.kernel is kernel
    packed.prepare(8)
    first = dict(packed._packs)
    for rows in (8, 6, 3, 2, 1):
        packed.prepare(rows)
        assert packed.rows == 8 and all(packed._packs[k] is first[k] for k in first)  # nothing repacked
        for weight, bias in linears:
            x = torch.randn(rows, 1, weight.shape[1], generator=gen)
            torch.testing.assert_close(packed.linear(x, (weight, bias)),
                                       torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    packed.prepare(16)
    assert packed.rows == 16 and packed._packs.keys() == first.keys()
    assert not any(packed._packs[k] is first[k] for k in first)
    too_few = PackedProjections(linears)
    too_few.prepare(2)
    assert too_few.rows == 0  # one or two rows: F.linear is as fast


def test_the_packed_kernel_is_measured_for_large_weights_only(monkeypatch):
    """Small weights take MKL's kernel (the first usable) without a measurement; large ones the kernel that
    `_fastest` measured, once per process; a kernel whose packing does not serve fewer rows is never picked."""
    from runrl_engine.rollout import cpu_decode

    usable = [k for k in cpu_decode.KERNELS if cpu_decode._reuse_holds(k)]
    if len(usable) < 2:
        pytest.skip("fewer than two packed kernels here: nothing to choose")
    measured = []
    monkeypatch.setattr(cpu_decode, "_FASTEST", [])
    monkeypatch.setattr(cpu_decode, "_fastest", lambda kernels: measured.append(kernels) or kernels[-1])
    small = cpu_decode.PackedProjections.CALIBRATE_MIN_BYTES - 1
    assert cpu_decode.packed_kernel(small) is usable[0] and usable[0].name == "mkl" and not measured
    large = cpu_decode.PackedProjections.CALIBRATE_MIN_BYTES
    assert cpu_decode.packed_kernel(large) is usable[-1] and cpu_decode.packed_kernel(large) is usable[-1]
    assert measured == [usable]  # measured once
    monkeypatch.setitem(cpu_decode._REUSE, "onednn", False)
    monkeypatch.setattr(cpu_decode, "_FASTEST", [])
    assert cpu_decode.packed_kernel(large).name == "mkl"  # the only usable one: no measurement
    assert measured == [usable]


def test_the_measurement_picks_the_faster_kernel():
    """`_fastest` times the real kernels: a kernel made slower (the same op plus a sleep) loses; the first kernel
    stays when the other is not `PICK_MARGIN` times faster."""
    from runrl_engine.rollout import cpu_decode

    usable = [k for k in cpu_decode.KERNELS if cpu_decode._reuse_holds(k)]
    if not usable:
        pytest.skip("no packed kernel here")
    k = usable[0]

    def slow_apply(*args):
        time.sleep(0.01)
        return k.apply(*args)

    slow = cpu_decode.PackedKernel("slow", k.pack, slow_apply)
    assert cpu_decode._fastest([slow, k], repeats=1) is k
    assert cpu_decode._fastest([k, slow], repeats=1) is k
    a, b = (cpu_decode.PackedKernel(name, k.pack, k.apply) for name in "ab")
    assert cpu_decode._pick([a, b], {"a": 1.0, "b": 0.9}) is a  # 1.11x faster: not enough to leave the first
    assert cpu_decode._pick([a, b], {"a": 1.0, "b": 0.7}) is b
    assert cpu_decode._pick([a, b], {"a": 0.7, "b": 1.0}) is a
