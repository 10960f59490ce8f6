"""SFT warm-start (`runrl_engine.sft`) on the builtin tiny model: it learns a format, trains only assistant tokens,
keeps a LoRA base frozen, and hands the model back to RL exactly as it got it (weights aside)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from runrl_engine.config import RunConfig
from runrl_engine.data import load_sft
from runrl_engine.models import load_policy, load_tokenizer
from runrl_engine.rollout.hf import generate
from runrl_engine.rollout.types import SamplingParams
from runrl_engine.sft import run_sft, sft_trainer

FRUITS = ["apple", "banana", "orange", "grape", "lemon", "cherry", "tomato", "potato"]
ANSWER = "<answer>aaa</answer>"
EOS, PAD = 507, 505


def user(fruit: str) -> list[dict]:
    return [{"role": "user", "content": f"Say the code for {fruit}"}]


def write_sft(path: Path, n: int = 32) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": user(FRUITS[i % len(FRUITS)]) + [{"role": "assistant", "content": ANSWER}]})
                    + "\n")
    return path


def make_cfg(sft_file: Path, **over) -> RunConfig:
    values = dict(model="builtin:tiny", prompt_file="unused.jsonl", reward_file="unused.py", sft_file=str(sft_file),
                  sft_epochs=4, sft_learning_rate=2e-2, micro_batch_size=4, max_prompt_length=64,
                  completion_length=32, seed=0)
    values.update(over)
    return RunConfig.from_dict(values)


def ids_of(tok, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def answer_logprob(model, tok) -> float:
    """Mean log-probability per token of ANSWER + <|im_end|> after each fruit's prompt (computed directly)."""
    model.eval()
    total, count = 0.0, 0
    answer = tok(ANSWER, add_special_tokens=False)["input_ids"] + [EOS]
    for fruit in FRUITS:
        prompt = ids_of(tok, user(fruit), generation_prompt=True)
        ids = torch.tensor([prompt + answer])
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        picked = logps.gather(-1, ids[0, 1:, None])[len(prompt) - 1:, 0]
        total, count = total + picked.sum().item(), count + len(answer)
    return total / count


def format_rate(model, tok) -> float:
    """Share of sampled completions (temperature 1) containing the taught `<answer>` tag."""
    model.eval()
    prompts = [ids_of(tok, user(f), generation_prompt=True) for f in FRUITS]
    comps = generate(model, prompts, num_samples=4, seeds=list(range(4 * len(FRUITS))),
                     params=SamplingParams(max_new_tokens=16), stop_ids={EOS}, pad_id=PAD)
    return sum("<answer>" in tok.decode(c.tokens) for c in comps) / len(comps)


def module_marks(model) -> dict[str, tuple]:
    """Per module: train flag, instance attribute names, hook counts (what a trainer could leave behind)."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {name: (m.training, sorted(m.__dict__), tuple(len(getattr(m, h)) for h in hooks))
            for name, m in model.named_modules()}


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_full")
    cfg = make_cfg(write_sft(tmp / "sft.jsonl"))
    tok = load_tokenizer(cfg)
    model = load_policy(cfg, "cpu", torch.float32)
    model.eval()
    before = {"logprob": answer_logprob(model, tok), "format": format_rate(model, tok), "marks": module_marks(model),
              "use_cache": model.config.use_cache, "config": model.config.to_dict(),
              "params": {n: (id(p), p.requires_grad, p.dtype) for n, p in model.named_parameters()}}
    records, lines = [], []
    rng_before = torch.random.get_rng_state()
    summary = run_sft(model, tok, cfg, tmp, log=lines.append, metrics=records.append, device="cpu")
    rng_after = torch.random.get_rng_state()
    marks_after = module_marks(model)  # before any helper below touches the model
    after = {"logprob": answer_logprob(model, tok), "format": format_rate(model, tok), "marks": marks_after,
             "rng_kept": torch.equal(rng_before, rng_after)}
    return cfg, model, summary, records, lines, before, after


def test_sft_lowers_the_loss_and_raises_the_answer_logprob(full_run):
    _, _, summary, _, _, before, after = full_run
    assert summary["sft/steps"] == 4 * 32 // 4
    assert summary["sft/loss_first"] > 5.0  # ~ln(512): random init
    assert summary["sft/loss_last"] < 0.3 * summary["sft/loss_first"]
    assert before["logprob"] < -5.0
    assert after["logprob"] > before["logprob"] + 3.0


def test_sft_raises_the_starting_reward_of_a_format_task(full_run):
    _, _, _, _, _, before, after = full_run
    assert before["format"] <= 0.05
    assert after["format"] >= 0.5


def test_metrics_get_sft_loss_every_step_and_log_summarises(full_run):
    cfg, _, summary, records, lines, _, _ = full_run
    assert [r["step"] for r in records] == list(range(1, summary["sft/steps"] + 1))
    for r in records:
        assert set(r) == {"step", "sft/loss", "sft/epoch", "sft/learning_rate"}
        assert math.isfinite(r["sft/loss"]) and r["sft/learning_rate"] <= cfg.sft_learning_rate
    assert records[0]["sft/loss"] == summary["sft/loss_first"] and records[-1]["sft/loss"] == summary["sft/loss_last"]
    assert records[-1]["sft/epoch"] == pytest.approx(cfg.sft_epochs)
    assert len(lines) == 2 and "32 example(s)" in lines[0] and f"{summary['sft/steps']} step(s)" in lines[1]


def test_model_is_handed_back_as_it_was(full_run):
    _, model, _, _, _, before, after = full_run
    assert after["marks"] == before["marks"]  # eval mode, no patched forward, no tags, no hooks
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.config.use_cache == before["use_cache"]
    assert model.config.to_dict() == before["config"]
    assert {n: (id(p), p.requires_grad, p.dtype) for n, p in model.named_parameters()} == before["params"]
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert after["rng_kept"]


def test_only_assistant_tokens_get_labels(tiny_model_dir, tmp_path):
    convs = [
        [{"role": "system", "content": "You are a helpful assistant."}, *user("apple"),
         {"role": "assistant", "content": ANSWER}],
        [*user("banana"), {"role": "assistant", "content": "<answer>bbb</answer>"},
         {"role": "user", "content": "Again, in one word"}, {"role": "assistant", "content": "bbb"}],
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = make_cfg(path)
    tok = load_tokenizer(cfg)
    trainer = sft_trainer(load_policy(cfg, "cpu", torch.float32), tok, cfg, load_sft(path), tmp_path, device="cpu")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(convs))])
    for row, conv in enumerate(convs):
        full = ids_of(tok, conv)
        n = len(full)
        assert batch["input_ids"][row, :n].tolist() == full
        expected = [-100] * n
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            start = len(ids_of(tok, conv[:i], generation_prompt=True))  # after "<|im_start|>assistant\n"
            end = full.index(EOS, start) + 1  # the body and its <|im_end|>; not the "\n" after it
            assert full[:start] == ids_of(tok, conv[:i], generation_prompt=True)
            expected[start:end] = full[start:end]
        assert batch["labels"][row, :n].tolist() == expected
        assert (batch["labels"][row, n:] == -100).all()  # padding
        assert sum(t != -100 for t in expected) == sum(
            len(tok(m["content"], add_special_tokens=False)["input_ids"]) + 1 for m in conv if m["role"] == "assistant")


def test_tool_calls_render_as_the_template_writes_them(tiny_model_dir, tmp_path):
    """Rows whose tool-call arguments have different keys: Arrow must not merge them into each other."""
    def conv(name, args):
        return [*user("apple"), {"role": "assistant", "content": None,
                                 "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]}]
    convs = [conv("get_weather", {"city": "Paris"}), conv("calculator", {"expression": "2 + 2", "precise": True})]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = make_cfg(path)
    tok = load_tokenizer(cfg)
    trainer = sft_trainer(load_policy(cfg, "cpu", torch.float32), tok, cfg, load_sft(path), tmp_path, device="cpu")
    assert [trainer.train_dataset[i]["input_ids"] for i in range(2)] == [ids_of(tok, c) for c in convs]


def test_template_without_assistant_markers_is_a_clear_error(tiny_model_dir, tmp_path):
    from runrl_engine.errors import UserError
    from runrl_engine.models import FALLBACK_CHAT_TEMPLATE

    cfg = make_cfg(write_sft(tmp_path / "sft.jsonl", n=2))
    tok = load_tokenizer(cfg)
    tok.chat_template = FALLBACK_CHAT_TEMPLATE  # what a base model without a template gets
    model = load_policy(cfg, "cpu", torch.float32)
    marks = module_marks(model)
    with pytest.raises(UserError, match="generation"):
        run_sft(model, tok, cfg, tmp_path, log=lambda _: None, metrics=lambda _: None, device="cpu")
    assert module_marks(model) == marks


def test_lora_sft_trains_only_the_same_adapter(tiny_model_dir, tmp_path):
    from peft.tuners.lora import LoraLayer

    cfg = make_cfg(write_sft(tmp_path / "sft.jsonl", n=16), use_lora=True, lora_rank=8, lora_alpha=16, sft_epochs=1)
    tok = load_tokenizer(cfg)
    model = load_policy(cfg, "cpu", torch.float32)
    model.train()  # as the RL trainer holds it; SFT must hand it back in train mode
    model.config.use_cache = True  # Trainer sets it to `args.use_cache` (False); it must come back True
    adapters = {n: (m, m.lora_A["default"], m.lora_B["default"]) for n, m in model.named_modules()
                if isinstance(m, LoraLayer)}
    assert adapters
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    marks = module_marks(model)

    summary = run_sft(model, tok, cfg, tmp_path, log=lambda _: None, metrics=lambda _: None, device="cpu")

    assert summary["sft/steps"] == 4
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    now = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert now.keys() == adapters.keys()
    for n, (layer, a, b) in adapters.items():
        assert now[n] is layer and layer.lora_A["default"] is a and layer.lora_B["default"] is b
    changed = {n for n, p in model.named_parameters() if not torch.equal(weights[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapter now does something
    base = [n for n, p in model.named_parameters() if "lora_" not in n]
    assert base and all(torch.equal(weights[n], dict(model.named_parameters())[n]) for n in base)
    assert module_marks(model) == marks and model.training and model.config.use_cache is True


# ---- templates TRL cannot make assistant-only: SFT tokenises the conversations itself ------------------------

SMOLLM2 = "builtin:smollm2-135m-instruct"
ADD_TOOL = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                              "parameters": {"type": "object", "required": ["a", "b"],
                                                             "properties": {"a": {"type": "number"},
                                                                            "b": {"type": "number"}}}}}]


def tool_conversation(a: int, b: int) -> list[dict]:
    from runrl_engine.tools.parsing import format_tool_call

    return [{"role": "system", "content": "Use the add tool, then answer inside <answer></answer>."},
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": format_tool_call("add", {"a": a, "b": b})},
            {"role": "tool", "content": str(float(a + b))},
            {"role": "assistant", "content": f"<answer>{a + b}</answer>"}]


def smollm2_setup(tmp_path: Path, convs: list[list[dict]], **over):
    """(cfg, tokenizer with the tool prompt, examples) for SmolLM2, as the trainer hands them to SFT."""
    from runrl_engine.tools.template import add_tool_prompt

    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = make_cfg(path, model=SMOLLM2, max_prompt_length=512, completion_length=64, **over)
    tok = load_tokenizer(cfg)
    assert add_tool_prompt(tok)
    return cfg, tok, load_sft(path)


def label_spans(tok, labels: list[int]) -> list[str]:
    """The decoded runs of consecutive labelled (!= -100) tokens."""
    spans, run = [], []
    for t in labels + [-100]:
        if t != -100:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def test_smollm2_labels_are_the_assistant_bodies_and_their_end_of_turn(smollm2_dir, tmp_path):
    from runrl_engine.sft import _trl_can_mask

    convs = [tool_conversation(6, 5), [*user("apple"), {"role": "assistant", "content": ANSWER}]]
    cfg, tok, examples = smollm2_setup(tmp_path, convs, padding_free=False)  # one conversation per row to inspect
    assert not _trl_can_mask(tok)  # no {% generation %} and not a template TRL knows: the path under test
    trainer = sft_trainer(load_policy(cfg, "cpu", torch.float32), tok, cfg, examples, tmp_path, device="cpu",
                          tools=ADD_TOOL)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(convs))])
    for row, conv in enumerate(convs):
        text = tok.apply_chat_template(conv, tools=ADD_TOOL, tokenize=False)
        full = tok(text, add_special_tokens=False)["input_ids"]
        assert batch["input_ids"][row, :len(full)].tolist() == full  # pieces tokenise as the whole render does
        assert '<tools>\n{"type": "function", "function": {"name": "add"' in text  # the tools reach SFT too
        labels = batch["labels"][row].tolist()
        assert (batch["labels"][row, len(full):] == -100).all()
        assert sum(t != -100 for t in labels) == sum(
            len(tok(m["content"], add_special_tokens=False)["input_ids"]) + 1 for m in conv if m["role"] == "assistant")
    assert label_spans(tok, batch["labels"][0].tolist()) == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 6, "b": 5}}\n</tool_call><|im_end|>',
        "<answer>11</answer><|im_end|>"]
    assert label_spans(tok, batch["labels"][1].tolist()) == [ANSWER + "<|im_end|>"]


def test_own_masks_equal_the_templates_generation_masks(tiny_model_dir):
    """On builtin:tiny, whose template marks assistant tokens with {% generation %}, the prefix-render masks must
    be exactly the template's own (transformers' `return_assistant_tokens_mask`), tool turns included."""
    from runrl_engine.sft import conversation_ids

    tok = load_tokenizer(make_cfg(Path("unused.jsonl")))
    convs = [tool_conversation(2, 3), [*user("kiwi"), {"role": "assistant", "content": "<answer>k</answer>"},
                                       {"role": "user", "content": "Again"}, {"role": "assistant", "content": "k"}]]
    for conv in convs:
        for tools in (None, ADD_TOOL):
            ids, mask = conversation_ids(tok, conv, tools)
            want = tok.apply_chat_template(conv, tools=tools, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
            assert ids == list(want["input_ids"]) and mask == list(want["assistant_masks"])
            assert sum(mask) > 0


def test_a_message_the_template_cannot_render_names_the_example(smollm2_dir, tmp_path):
    from runrl_engine.errors import DataError
    from runrl_engine.sft import conversation_ids

    _, tok, _ = smollm2_setup(tmp_path, [tool_conversation(1, 1)])
    conv = [*user("apple"), {"role": "assistant", "content": None,  # SmolLM2's template reads `content` only
                             "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {}}}]}]
    with pytest.raises(DataError, match="cannot render") as err:
        conversation_ids(tok, conv, ADD_TOOL, where="sft.jsonl:3")
    assert err.value.where == "sft.jsonl:3" and "<tool_call>" in err.value.fix


@pytest.mark.slow  # ~25 s on 2 busy cores: two forward/backward passes of the real 135 M model
def test_two_step_sft_on_smollm2(smollm2_dir, tmp_path):
    """Both examples in one batch for two epochs: step 2's loss is the same tokens' loss after one update, so it
    must be lower (short conversations, without tool schemas, to keep the real model's passes short on CPU)."""
    convs = [[*user(fruit), {"role": "assistant", "content": ANSWER}] for fruit in FRUITS[:2]]
    cfg, tok, examples = smollm2_setup(tmp_path, convs, micro_batch_size=2, sft_epochs=2, sft_learning_rate=1e-4)
    model = load_policy(cfg, "cpu", torch.float32)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    records, lines = [], []
    summary = run_sft(model, tok, cfg, tmp_path, log=lines.append, metrics=records.append, device="cpu")
    assert summary["sft/steps"] == 2 and "2 example(s)" in lines[0]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["sft/loss"]) for r in records)
    assert 0.0 < summary["sft/loss_first"] < 5.0  # a pretrained model on assistant tokens, not ~ln(49152) = 10.8
    assert summary["sft/loss_last"] < 0.9 * summary["sft/loss_first"]
    assert any(not torch.equal(weights[n], p) for n, p in model.named_parameters())


def _batch_loss_and_grads(trainer, rows: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=int((batch["labels"][:, 1:] != -100).sum()))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padding_free_batches_give_the_padded_loss_and_gradients(tiny_model_dir, tmp_path, monkeypatch):
    """The own-masks path (templates TRL cannot mask) packs a batch's conversations into one row: same loss and
    gradients as the padded batch, rows longer than max_length truncated, and ones left without an assistant
    token dropped, as TRL does for padded rows."""
    import runrl_engine.sft as sft

    monkeypatch.setattr(sft, "_trl_can_mask", lambda tok: False)  # builtin:tiny's template would go to TRL
    monkeypatch.setattr(sft, "packed_rows_pay", lambda *args: True)  # on the tiny model attention dominates
    convs = [[*user(f), {"role": "assistant", "content": "<answer>" + "a" * (3 + 5 * i) + "</answer>"}]
             for i, f in enumerate(FRUITS[:4])]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    results = {}
    for padding_free in (False, True):
        cfg = make_cfg(path, padding_free=padding_free)
        model = load_policy(cfg, "cpu", torch.float32)
        trainer = sft_trainer(model, load_tokenizer(cfg), cfg, load_sft(path), tmp_path / str(padding_free),
                              device="cpu")
        rows = [trainer.train_dataset[i] for i in range(len(convs))]
        batch = trainer.data_collator(rows)
        assert batch["input_ids"].shape[0] == (1 if padding_free else len(convs))
        results[padding_free] = _batch_loss_and_grads(trainer, rows)
    (loss_padded, grads_padded), (loss_free, grads_free) = results[False], results[True]
    assert loss_free == pytest.approx(loss_padded, rel=1e-5)
    assert grads_free.keys() == grads_padded.keys()
    for name, g in grads_padded.items():
        torch.testing.assert_close(grads_free[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))

    # max_length = max_prompt_length + completion_length: a prompt that fills it leaves no assistant token
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": ANSWER}]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in [*convs, long]))
    cfg = make_cfg(path, padding_free=True)
    trainer = sft_trainer(load_policy(cfg, "cpu", torch.float32), load_tokenizer(cfg), cfg, load_sft(path),
                          tmp_path / "trunc", device="cpu")
    assert trainer.args.padding_free and len(trainer.train_dataset) == len(convs)
    assert all(len(row["input_ids"]) <= 96 for row in trainer.train_dataset)
