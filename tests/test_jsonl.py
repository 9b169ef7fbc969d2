"""jsonl corpora: records in mlx-lm's three formats, rendered, packed with a mask, and trained with the
loss on the completions and assistant turns only; chat templates in a sandbox; malformed lines."""

import json
import random
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, packing, records, train
from mlxllm import data as data_mod
from mlxllm.chat import PLAIN_TEMPLATE, ChatTemplate, template_for
from mlxllm.config import ModelConfig, TokenizerConfig, TrainConfig
from mlxllm.corpus import open_corpus
from mlxllm.cpu.streams import Split
from mlxllm.device import cache_dir
from mlxllm.model import build_model
from mlxllm.step import evaluate, make_eval, make_optimizer, make_step
from mlxllm.tokenizer import load_tokenizer

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import OBJECTS, SUBJECTS, VERBS, tiny_configs
from mlx.utils import tree_flatten

BYTE = TokenizerConfig(kind="byte")
EOS = 256


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Questions whose answer follows from the question (learnable), prompts longer than answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s, v = rng.choice(SUBJECTS), rng.choice(VERBS)
        out.append((f"Question: what does {s} {v.rstrip('s')}?\nAnswer:", f" {OBJECTS[len(s + v) % len(OBJECTS)]}."))
    return out


def corpus_of(kind: str, n: int, seed: int = 0) -> list[dict]:
    pairs = qa(n, seed)
    if kind == "text":
        return [{"text": p + c} for p, c in pairs]
    if kind == "completion":
        return [{"prompt": p, "completion": c} for p, c in pairs]
    return [
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
            + [{"role": "assistant", "content": c}]
        }
        for p, c in pairs
    ]


@pytest.mark.parametrize("kind", ["text", "completion", "messages"])
def test_each_record_kind_trains(kind: str, tmp_path: Path):
    path = write_jsonl(tmp_path / f"{kind}.jsonl", corpus_of(kind, 400))
    m, t, k = tiny_configs(path, tmp_path / "run", max_steps=40, eval_interval=10, eval_batches=2)
    d = data_mod.prepare(path, k)
    assert (d.train_mask is None) == (kind == "text")
    result = train(RunConfig(m, k, t), show_progress=False, data=d)
    losses = [h["val_loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses


def test_only_completion_tokens_count_and_are_the_completions_in_order(tmp_path: Path):
    pairs = qa(200, seed=1)
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    d = data_mod.prepare(path, BYTE)
    # every 10th record validates; the others train, in order
    train_pairs = [pc for i, pc in enumerate(pairs) if i % 10 != 9]
    val_pairs = [pc for i, pc in enumerate(pairs) if i % 10 == 9]
    for split, mask, counted, want in (
        (d.train, d.train_mask, d.train_counted, train_pairs),
        (d.val, d.val_mask, d.val_counted, val_pairs),
    ):
        assert len(split) == sum(len((p + c).encode()) + 1 for p, c in want)  # each record ends with EOS
        assert counted == int(np.asarray(mask).sum()) == sum(len(c.encode()) + 1 for _, c in want)
        kept = np.asarray(split)[np.asarray(mask) == 1]
        assert kept.tolist() == [i for _, c in want for i in [*c.encode(), EOS]]
    assert d.val_bytes == sum(len(c.encode()) for _, c in val_pairs)
    unmasked = data_mod.prepare(path, BYTE, mask_prompt=False)
    assert unmasked.train_mask is None and np.array_equal(unmasked.train, d.train)


def _hand_loss(model, batch: np.ndarray) -> tuple[float, int]:
    """The mean over counted targets, from the model's logits in float64, and how many were counted."""
    tokens, mask = batch[..., 0, :], batch[..., 1, 1:]
    tokens, mask = tokens.reshape(-1, tokens.shape[-1]), mask.reshape(-1, mask.shape[-1])
    logits = np.array(model(mx.array(tokens[:, :-1])).astype(mx.float32)).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return float((ce * mask).sum() / mask.sum()), int(mask.sum())


def _masked_batch(tmp_path: Path, accum: int, rows: int, seq_len: int) -> np.ndarray:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "completion": c} for p, c in qa(300, seed=2)])
    d = data_mod.prepare(path, BYTE)
    batch = data_mod.train_batch(d, seed=0, step=3, batch_size=rows, seq_len=seq_len, accum=accum).copy()
    batch[0, 0, 1, 1:4], batch[0, 0, 1, 4:] = 1, 0  # micro-batch 0: a row of 3 counted targets, then none
    batch[0, 1, 1, :] = 0
    batch[0, 2:, 1, -1] = batch[1, :, 1, -1] = 1  # and no slice of 2 rows without a counted target
    return batch


def test_masked_loss_and_gradient_are_over_the_global_batchs_counted_targets(tmp_path: Path):
    """grad_accum 2 and 2 CPU streams: the loss is the mean over all counted targets of the step, not
    a mean of the micro-batches' or the streams' means, and so is its gradient."""
    accum, rows, seq_len = 2, 4, 32
    batch = _masked_batch(tmp_path, accum, rows, seq_len)
    model = build_model(ModelConfig(vocab_size=257, n_layers=2, d_model=64, n_heads=4, max_seq_len=64), seed=0)
    hand, n_counted = _hand_loss(model, batch)
    assert n_counted == int(sum(np.count_nonzero(b[:, 1, 1:]) for b in batch))
    slices = [b[i : i + rows // 2] for b in batch for i in (0, rows // 2)]
    mean_of_means = np.mean([_hand_loss(model, s[None])[0] for s in slices])
    assert abs(mean_of_means - hand) > 0.01  # the test can tell the two apart

    def exact(params, tokens, mask):  # exact exp, one pass over the whole global batch
        model.update(params)
        ce = nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        return (ce * mask).sum() / mask.sum()

    flat = batch.reshape(-1, 2, seq_len + 1)
    params = model.trainable_parameters()
    grads = mx.grad(exact)(params, mx.array(flat[:, 0]), mx.array(flat[:, 1, 1:]).astype(mx.float32))
    model.update(params)
    want_norm = float(mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads))))

    cfg = TrainConfig(batch_size=rows, grad_accum=accum, seq_len=seq_len, cpu_streams=2, grad_clip=1e9)
    step = make_step(model, make_optimizer(cfg), cfg, split=Split(2, 2))
    loss, norm = step(mx.array(batch))
    assert float(loss) == pytest.approx(hand, abs=2e-4)
    assert float(norm) == pytest.approx(want_norm, rel=2e-3)


def test_masked_validation_is_the_mean_over_every_counted_target(tmp_path: Path):
    batch = _masked_batch(tmp_path, 2, 4, 32)
    model = build_model(ModelConfig(vocab_size=257, n_layers=2, d_model=64, n_heads=4, max_seq_len=64), seed=1)
    batches = [batch[0], batch[1][:2]]  # batches of unequal sizes and unequal counted shares
    hand, _ = _hand_loss(model, np.concatenate(batches)[None])
    cfg = TrainConfig(batch_size=4, seq_len=32, cpu_streams=2)
    got = evaluate(make_eval(model, cfg, Split(2, 2)), batches, bytes_per_token=1.0)["val_loss"]
    assert got == pytest.approx(hand, abs=2e-4)


def test_the_tokenizer_learns_the_rendered_text_not_the_json(tmp_path: Path):
    rows = corpus_of("messages", 3)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    want = []
    for r in rows:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in r["messages"])
        want += text.split("\n")
    assert list(data_mod.corpus_lines(open_corpus(path))) == want
    path = write_jsonl(tmp_path / "big.jsonl", corpus_of("messages", 400))
    d = data_mod.prepare(path, TokenizerConfig(kind="bpe", vocab_size=400))
    pieces = [d.tokenizer.sp.id_to_piece(i) for i in range(d.tokenizer.vocab_size)]
    assert any("assist" in p for p in pieces) and not any('"' in p or "role" in p for p in pieces)


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"prompt": "a", "completion": ', "not valid JSON"),
        ('{"prompt": "a"}', '"completion" is missing'),
        ('{"messages": [{"role": "user"}]}', "message 1"),
        ('["text"]', "a JSON list"),
        ('{"txt": "a"}', "no text, prompt/completion or messages key"),
    ],
)
def test_a_malformed_line_is_named_and_nothing_is_written(tmp_path: Path, line: str, problem: str):
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    before = set((cache_dir() / "data").glob("*")) if (cache_dir() / "data").exists() else set()
    with pytest.raises(MlxllmError) as e:
        data_mod.prepare(path, BYTE)
    message = str(e.value)
    assert f"{path}, line 4: {problem}" in message and "\n" not in message
    assert set((cache_dir() / "data").glob("*")) == before


CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def hf_chat(tmp_path_factory: pytest.TempPathFactory):
    """A small byte-level BPE tokenizer saved by transformers with a ChatML template: (folder, tokenizer)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [m["content"] for r in corpus_of("messages", 300) for m in r["messages"]] + ["system user assistant"]
    tk.train_from_iterator(texts, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>")
    hf.chat_template = CHATML
    folder = tmp_path_factory.mktemp("hf_chat")
    hf.save_pretrained(str(folder))
    return folder, transformers.AutoTokenizer.from_pretrained(str(folder))


def test_a_transformers_chat_template_renders_as_apply_chat_template(hf_chat):
    folder, hf = hf_chat
    tok = load_tokenizer(folder)
    template = template_for(tok)
    assert not template.plain and template.tokens["bos_token"] == "<s>"
    conversation = corpus_of("messages", 1, seed=3)[0]["messages"]
    conversation += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": " The end."}]
    for prompt in (False, True):
        want = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
        assert template.render(conversation, add_generation_prompt=prompt) == want
    parts = records.parts("messages", {"messages": conversation}, template, mask=True)
    ids, mask, _ = packing.encode_record(parts, tok)
    want_ids = hf.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert ids[:-1] == want_ids and ids[-1] == tok.eos_id == hf.eos_token_id  # then the record's EOS
    counted = [p.text for p in parts if p.counted]
    assert counted == [m["content"] + "<|im_end|>\n" for m in conversation if m["role"] == "assistant"]
    assert sum(mask) == sum(len(hf.encode(c, add_special_tokens=False)) for c in counted) + 1


def test_a_template_that_reaches_for_code_or_files_is_refused(tmp_path: Path):
    (tmp_path / "secret.txt").write_text("secret")
    hostile = [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% include '" + str(tmp_path / "secret.txt") + "' %}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ self.__init__.__globals__ }}",
    ]
    for source in hostile:
        with pytest.raises(MlxllmError, match="chat template") as e:
            ChatTemplate(source, origin="a test").render([{"role": "user", "content": "hi"}])
        assert "secret" not in str(e.value) and "uid=" not in str(e.value)


def test_a_template_failing_on_a_record_names_its_line_and_writes_nothing(tmp_path: Path, hf_chat):
    folder, _ = hf_chat
    picky = tmp_path / "picky"
    picky.mkdir()
    for f in folder.iterdir():
        (picky / f.name).write_bytes(f.read_bytes())
    config = json.loads((picky / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    config["chat_template"] += CHATML
    (picky / "tokenizer_config.json").write_text(json.dumps(config))
    (picky / "chat_template.jinja").unlink(missing_ok=True)
    tok = load_tokenizer(picky)
    rows = corpus_of("messages", 5) + [{"messages": [{"role": "tool", "content": "x"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    before = set((cache_dir() / "data").glob("*"))
    with pytest.raises(MlxllmError, match=r"line 6: .*no tools here"):
        data_mod.prepare(path, BYTE, tokenizer=tok)
    assert set((cache_dir() / "data").glob("*")) == before


def test_a_template_with_generation_marks_renders_as_transformers(hf_chat):
    _, hf = hf_chat
    marked = CHATML.replace(
        "{{ '<|im_start|>' + message['role']", "{% generation %}{{ '<|im_start|>' + message['role']"
    )
    marked = marked.replace("+ '\n' }}{% endfor %}", "+ '\n' }}{% endgeneration %}{% endfor %}")
    assert marked != CHATML and "endgeneration" in marked
    conversation = corpus_of("messages", 1)[0]["messages"]
    want = hf.apply_chat_template(conversation, tokenize=False, chat_template=marked)
    assert ChatTemplate(marked, {"bos_token": "<s>"}).render(conversation) == want


def test_plain_template_is_documented_and_prefix_consistent():
    template = ChatTemplate(PLAIN_TEMPLATE)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert template.render(conversation) == "<|user|>\nHi\n<|assistant|>\nHello\n"
    assert template.render(conversation[:1], add_generation_prompt=True) == "<|user|>\nHi\n<|assistant|>\n"
    assert [(p.text, p.counted) for p in template.parts(conversation)] == [
        ("<|user|>\nHi\n<|assistant|>\n", False),
        ("Hello\n", True),
    ]


def test_instruction_tuning_an_imported_chat_model_learns_the_assistant_turns(hf_chat, tmp_path: Path):
    """A Llama saved by transformers with its chat tokenizer, tuned on chat records (a validation file of
    its own): its masked eval loss falls, over the same tokens before and after (the template kept)."""
    from mlxllm.evaluate import evaluate_model

    torch = pytest.importorskip("torch", reason="PyTorch (CPU) is not installed; .ci/run installs it")
    import transformers

    folder, hf = hf_chat
    llama = tmp_path / "llama"
    config = transformers.LlamaConfig(
        vocab_size=len(hf),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(llama))
    hf.save_pretrained(str(llama))
    data = write_jsonl(tmp_path / "train.jsonl", corpus_of("messages", 300))
    val = write_jsonl(tmp_path / "val.jsonl", corpus_of("messages", 40, seed=9))
    before = evaluate_model(llama, val)
    m, t, k = tiny_configs(
        data, tmp_path / "run", max_steps=40, eval_interval=20, init_from=str(llama), val_data=str(val)
    )
    result = train(RunConfig(m, k, t), show_progress=False)
    after = evaluate_model(result.run_dir, val, which="latest")
    assert before.masked and after.tokens == before.tokens and after.seq_len == before.seq_len == 128
    assert after.loss < before.loss - 1.0, (before.loss, after.loss)
