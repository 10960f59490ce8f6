"""Offline builder for tiny Qwen2-style causal LMs: `builtin:tiny` and `builtin:small`.

Tests, the CPU quickstart and benchmarks need a real Hugging Face model directory without touching a model hub.
`build_tiny_model(name)` writes one, deterministically and in a few seconds: a randomly initialised (seeded)
`Qwen2ForCausalLM` saved as safetensors, plus a byte-level BPE tokenizer (512 ids including the ChatML and Hermes
tool-calling special tokens) trained here on a corpus generated in code, with a ChatML chat template. Anywhere
a model id is accepted, `resolve_model_path("builtin:tiny")` turns the id into that directory; the same function
resolves the real packaged model (`builtin:smollm2-135m-instruct`) and `*.gguf` files through `gguf_cache`.

Build is cached under `$RUNRL_CACHE_DIR` (default `~/.cache/runrl_engine`) in `builtin/<name>-v<version>-<hash>/`;
the hash covers everything that shapes the output (spec, corpus, template, special tokens), so a changed builder
never reuses a stale directory. A build is written to a temporary directory and renamed into place, so concurrent
builders (two `accelerate launch` ranks, parallel pytest workers) never see a half-written model.

The tokenizer copies Qwen2's exact layout (NFC normaliser, Qwen2's split regex, byte-level BPE without prefix
space) because transformers 5 loads any `model_type: qwen2` directory through `Qwen2Tokenizer`, which rebuilds
the backend from vocab + merges with that layout and ignores the pre-tokeniser in `tokenizer.json`. Matching it
means `AutoTokenizer.from_pretrained(dir)` and `tokenizers.Tokenizer.from_file(dir/tokenizer.json)` give the
same ids. Consequence of NFC: text that is not NFC (e.g. "e" + combining accent) decodes to its NFC form, as
with real Qwen tokenizers; NFC text round-trips exactly.

Not covered: the weights are random, so generations are noise until trained; no other architectures or sizes;
no cleanup of old cache versions (delete the cache directory to reclaim the space).

This module imports neither torch nor transformers at import time; the build function does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runrl_engine.errors import UserError

BUILTIN_PREFIX = "builtin:"

# Bump when the build changes in a way the fingerprint below cannot see (e.g. a different init scheme or dtype).
BUILDER_VERSION = 1

# Marker written last inside a finished build; a directory without it is not a usable model.
STAMP_FILE = "runrl_tiny.json"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
# ChatML control tokens are special (skipped by `decode(skip_special_tokens=True)`); the tool tags are plain added
# tokens, as in Qwen2.5, so a decoded completion still contains its tool calls for the parser.
CONTROL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
TOOL_TOKENS = (TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END)
SPECIAL_TOKENS = CONTROL_TOKENS + TOOL_TOKENS

VOCAB_SIZE = 512
MAX_POSITIONS = 2048

# Qwen2's pre-tokenisation regex, verbatim from transformers' `tokenization_qwen2.PRETOKENIZE_REGEX`: the loader
# re-applies it whatever tokenizer.json says, so ours must be the same for ids to agree (tested).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class TinySpec:
    """Architecture of one builtin model (all Qwen2 defaults not listed here are kept)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = MAX_POSITIONS
    seed: int = 0


BUILTIN_MODELS: dict[str, TinySpec] = {
    "tiny": TinySpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256),
    "small": TinySpec(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=1024),
}

# ChatML in the Qwen2.5 layout, including its tool-calling system prompt and tool-response grouping. Differences
# from Qwen2.5, each for a reason:
# - no default system prompt ("You are Qwen...") when none is given: it would be noise for a tiny model;
# - the assistant body and its <|im_end|> sit inside {% generation %} so TRL's assistant-only SFT loss (and
#   `return_assistant_tokens_mask`) trains the stop token; the "\n" after it is not something the model emits;
# - string `arguments` (OpenAI wire format) are inserted as-is instead of being JSON-encoded a second time;
# - content may be a string, None or a list of {"type": "text", "text": ...} parts.
# Prefix property (the multi-turn trainer relies on it): nothing rendered for message i depends on later messages,
# except that consecutive tool messages share one user turn; so at every turn boundary, rendering a prefix with
# add_generation_prompt, then appending the assistant body + "<|im_end|>\n", gives the full rendering's prefix.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}\n"
    "    {%- if content is string -%}\n"
    "        {{- content -}}\n"
    "    {%- elif content is iterable and content is not mapping -%}\n"
    "        {%- for part in content -%}\n"
    "            {%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages and messages[0].role == 'system' %}\n"
    "        {{- render_content(messages[0].content) + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- '\\n' + (tool | tojson) }}\n"
    "    {%- endfor %}\n"
    "    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'system' and loop.first and tools %}\n"
    "        {#- already merged into the tools system prompt above #}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant\\n' }}\n"
    "        {%- generation %}\n"
    "        {%- set text = render_content(message.content) %}\n"
    "        {{- text }}\n"
    "        {%- for tool_call in (message.tool_calls or []) %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {%- if text or not loop.first %}\n"
    "                {{- '\\n' }}\n"
    "            {%- endif %}\n"
    "            {{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}\n"
    "            {%- if tool_call.arguments is string %}\n"
    "                {{- tool_call.arguments }}\n"
    "            {%- else %}\n"
    "                {{- tool_call.arguments | tojson }}\n"
    "            {%- endif %}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>' }}\n"
    "        {%- endgeneration %}\n"
    "        {{- '\\n' }}\n"
    "    {%- elif message.role == 'tool' %}\n"
    "        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' }}\n"
    "        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


# --------------------------------------------------------------------------------------------------------------
# Public API


def is_builtin(model: str) -> bool:
    """True for ids of the form `builtin:NAME` (whether or not NAME exists; `resolve_model_path` checks that)."""
    return isinstance(model, str) and model.startswith(BUILTIN_PREFIX)


def resolve_model_path(model: str) -> str:
    """A model id as a loadable path: `builtin:NAME` -> the built (cached) model directory, `builtin:` names of
    packaged real models and `*.gguf` files -> their converted (cached) HF directory (see `gguf_cache`); any other
    id or path is returned unchanged."""
    from runrl_engine import gguf_cache

    if gguf_cache.is_gguf_path(model):
        return str(gguf_cache.converted_dir(model))
    if not is_builtin(model):
        return model
    name = model[len(BUILTIN_PREFIX):]
    if name in gguf_cache.BUILTIN_GGUF:
        return str(gguf_cache.converted_dir(gguf_cache.packaged_gguf_path(name)))
    return str(build_tiny_model(name))


def build_tiny_model(name: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """Build (or find in the cache) the builtin model `name` and return its Hugging Face model directory."""
    spec = _spec(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "builtin" / f"{name}-v{BUILDER_VERSION}-{fingerprint(name)}"
    if (final / STAMP_FILE).is_file():
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_model_dir(name, spec, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published model is an ordinary shared directory
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_cache_dir() -> Path:
    """`$RUNRL_CACHE_DIR`, else `~/.cache/runrl_engine` (read at call time so tests can redirect it)."""
    env = os.environ.get("RUNRL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "runrl_engine"


def fingerprint(name: str) -> str:
    """Short hash of every input that shapes the build of `name`; part of the cache directory name."""
    payload = json.dumps(
        {
            "builder_version": BUILDER_VERSION,
            "spec": dataclasses.asdict(_spec(name)),
            "special_tokens": SPECIAL_TOKENS,
            "regex": PRETOKENIZE_REGEX,
            "template": CHAT_TEMPLATE,
            "corpus": hashlib.sha256("\n".join(tokenizer_corpus()).encode()).hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


_WORDS = """
the be to of and a in that have i it for not on with he as you do at this but his by from they we say her she or
an will my one all would there their what so up out if about who get which go me when make can like time no just
him know take people into year your good some could them see other than then now look only come its over think
also back after use two how our work first well way even new want because any these give day most us is are was
were been has had did said made went got very more many much each every few little big small long short old young
great high low right left same different next last early late own sure true false best better worst world life
hand part child eye woman man place week case point number group problem fact water money story word letter
letters count answer question result step reward score total sum list name value key tool call function arguments
response system user assistant message content role string integer float boolean null object array weather city
temperature search query file read write code python json text line lines character characters vowel vowels
consonant example input output test pass fail error try again correct wrong yes maybe please thank thanks hello
world sorry ok okay here where why how what which while until before between under above around through during
without within along across behind beyond near far home house school book paper car road tree river sun moon star
sky rain snow wind fire earth air food bread apple banana orange grape lemon cherry strawberry blueberry tomato
potato cat dog bird fish horse cow mouse lion tiger bear red blue green yellow black white brown purple pink gray
one two three four five six seven eight nine ten hundred thousand million first second third half double single
add subtract multiply divide plus minus times equal equals greater less more fewer zero odd even prime square
root calculate compute solve find show tell explain describe compare check verify return print start stop end
open close run walk talk speak listen learn teach play work rest sleep eat drink buy sell pay send receive ask
reply choose decide keep let begin seem help turn move live believe hold bring happen stand lose meet include
continue set change lead understand watch follow create spend grow offer remember love consider appear wait serve
die build stay fall cut reach kill remain suggest raise report pull carry break draw
"""

_TASK_SNIPPETS = (
    "Count the number of letters in the word",
    "How many times does the letter r appear in strawberry?",
    "The answer is",
    "Let's think step by step.",
    "Final answer:",
    "<answer>42</answer>",
    "\\boxed{7}",
    "tool_call",
    "tool_response",
    "get_weather",
    "get_current_time",
    "calculator",
    "search_web",
    "read_file",
    "# Tools",
    "You may call one or more functions to assist with the user query.",
    "You are provided with function signatures within <tools></tools> XML tags:",
    "For each function call, return a json object with function name and arguments within XML tags:",
    '{"name": <function-name>, "arguments": <args-json-object>}',
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the weather", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}',
    "def reward_fn(completion, **kwargs):\n    return float(len(completion) > 0)\n",
    "You are a helpful assistant.",
)


def tokenizer_corpus() -> list[str]:
    """The training text for the tokenizer: deterministic, generated here, English + digits + JSON + chat text."""
    words = _WORDS.split()
    rng = random.Random(20240607)  # fixed: the corpus (and so the vocab) must never change between builds
    lines = list(_TASK_SNIPPETS)
    lines.append(" ".join(words))
    lines.append(" ".join(w.capitalize() for w in words))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -1 1e-3 50% $5 #1")
    lines.append("! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~")
    for _ in range(400):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ":", ","]))
    for _ in range(150):
        word = rng.choice(words)
        number = rng.randint(0, 999)
        lines.append(f'Count the letters in "{word}". The answer is {len(word)}.')
        lines.append(f'{{"name": "{rng.choice(words)}", "arguments": {{"{rng.choice(words)}": {number}}}}}')
        lines.append(f"<|im_start|>user\nWhat is {number} + {len(word)}?<|im_end|>\n<|im_start|>assistant\n"
                     f"{number} + {len(word)} = {number + len(word)}<|im_end|>\n")
    return lines


def _build_tokenizer():
    """Train the byte-level BPE `tokenizers.Tokenizer` (Qwen2 layout, 505 learned ids + 7 special tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, byte_fallback=False, dropout=None))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    learned = VOCAB_SIZE - len(SPECIAL_TOKENS)
    # The empty prefix/suffix are no-ops, spelled out so the trained model serialises exactly as Qwen2Tokenizer
    # rebuilds it (the tests compare the two backends field by field).
    trainer = trainers.BpeTrainer(vocab_size=learned, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  continuing_subword_prefix="", end_of_word_suffix="")
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != learned:  # the corpus ran out of merges: a builder bug, not a user error
        raise RuntimeError(f"tiny tokenizer learned {tokenizer.get_vocab_size()} ids, expected {learned}")

    # Special tokens go after the learned vocab (as in Qwen), in a fixed order so their ids are stable.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Model directory


def _spec(name: str) -> TinySpec:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        from runrl_engine.gguf_cache import BUILTIN_GGUF

        valid = ", ".join(BUILTIN_PREFIX + n for n in (*BUILTIN_MODELS, *BUILTIN_GGUF))
        raise UserError(f"unknown builtin model {BUILTIN_PREFIX}{name}", where="model",
                        fix=f"use one of: {valid}, or a Hugging Face model id / local directory") from None


def _write_model_dir(name: str, spec: TinySpec, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    backend = _build_tokenizer()
    pad_id, eos_id = backend.token_to_id(ENDOFTEXT), backend.token_to_id(IM_END)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        model_max_length=spec.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    # transformers 5 saves the template as chat_template.jinja by default; keep it in tokenizer_config.json,
    # where every loader (older transformers, vLLM, plain JSON readers) finds it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    _patch_tokenizer_config(out / "tokenizer_config.json")

    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,  # at this size a separate lm_head would be most of the parameters
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # fork_rng: seed for a reproducible init without disturbing the caller's global RNG; CPU so that a default
    # CUDA device set by the caller cannot change the numbers.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    # Stop on <|im_end|> (end of an assistant turn) and on <|endoftext|> (end of a raw document), as Qwen does.
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(out, safe_serialization=True)

    stamp = {
        "name": name,
        "builder_version": BUILDER_VERSION,
        "fingerprint": fingerprint(name),
        "spec": dataclasses.asdict(spec),
        "special_token_ids": {t: backend.token_to_id(t) for t in SPECIAL_TOKENS},
    }
    (out / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")


def _patch_tokenizer_config(path: Path) -> None:
    """Name the class transformers will load anyway for `model_type: qwen2`, so the file says what you get."""
    data = json.loads(path.read_text())
    data["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def publish_dir(tmp: Path, final: Path, stamp_file: str = STAMP_FILE) -> None:
    """Move a finished build into place; if another process got there first, keep theirs (it is identical).

    A build is finished when `stamp_file` exists in it (written last)."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if (final / stamp_file).is_file():
            return
    # `final` exists without a stamp: a directory damaged by hand. Move it aside (atomic, so a concurrent
    # builder doing the same cannot delete ours) and retry once.
    junk = Path(tempfile.mkdtemp(prefix=f".{final.name}.broken-", dir=final.parent))
    try:
        os.rename(final, junk / "old")
    except OSError:
        pass
    shutil.rmtree(junk, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / stamp_file).is_file():
            raise
