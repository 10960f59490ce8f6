import torch

from runrl_engine.batch import RolloutBatch, pad_left, pad_right
from runrl_engine.rollout.hf import SamplingParams, filter_logits, generate


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
