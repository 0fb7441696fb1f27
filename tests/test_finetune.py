"""Fine-tuning behaviour on tiny in-process models: heads learn, LoRA touches only adapters, SFT learns
only responses, bad data is a clear error, exports round-trip."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.core.errors import LmforgeError
from lmforge.finetune.examples import (
    check_labels, classify_collate, encode_sft, encode_texts, label_set, read_examples, special_ids, split_train_val,
)
from lmforge.finetune.inference import FinetunedModel, load_finetuned
from lmforge.finetune.methods import apply_method, count_params, merged_model
from lmforge.finetune import recipe
from lmforge.finetune.objectives import task_spec
from lmforge.model.decoder import IGNORE_INDEX
from lmforge.train.export import save_finetuned
from lmforge.model.decoder import build_model
from lmforge.model.decoder import ModelConfig, Transformer
from lmforge.core.params import FinetuneParams, LoraParams, Params
from lmforge.train.distributed import DistInfo
from lmforge.train.early_stopping import EarlyStopping
from lmforge.core.params import TrainerParams
from lmforge.train.batches import Examples

from lmforge.train.trainer import Trainer

CONFIG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32)
GROUP_A = "red green blue cyan pink gold".split()
GROUP_B = "cat dog fox owl bee ant".split()
FILLER = "the a of to in on".split()
WORDS = GROUP_A + GROUP_B + FILLER + "ask say why how".split()


def word_tokenizer(path=None) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|pad|>", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    if path is not None:
        tok.save(str(path))
    return tok


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """A text of filler words plus words of one group: label 'colour' or 'animal'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["colour", "animal"])
        words = [rng.choice(GROUP_A if label == "colour" else GROUP_B) for _ in range(rng.randint(1, 3))]
        words += [rng.choice(FILLER) for _ in range(rng.randint(1, 6))]
        rng.shuffle(words)
        rows.append({"id": str(i), "text": " ".join(words), "label": label})
    return rows


def classify_data(tok, rows, labels, max_length=16):
    eos, _ = special_ids(tok)
    ids = encode_texts(tok, [r["text"] for r in rows], max_length, eos)
    return list(zip(ids, [labels.index(r["label"]) for r in rows]))


def cfg(**kw) -> TrainerParams:
    return TrainerParams(**{"max_steps": 40, "micro_batch_size": 16, "warmup_steps": 0, "eval_every": 0,
                          "eval_batches": 4, "checkpoint_every": 0, "progress": False, "lr": 3e-3,
                          "min_lr": 3e-4, "weight_decay": 0.0, **kw})


def classify_trainer(model, tok, rows, labels, early_stopping=None, **kw) -> Trainer:
    train, val = split_train_val(rows, 0.25, "text")
    _, pad = special_ids(tok)
    spec = task_spec("classify", pad)
    data = Examples(classify_data(tok, train, labels), classify_data(tok, val, labels), spec.collate, 16)
    return Trainer(model, cfg(**kw), data, loss_fn=spec.loss_fn, eval_fn=spec.eval_fn, early_stopping=early_stopping)


def test_classification_head_learns_a_separable_task():
    torch.manual_seed(0)
    tok, rows = word_tokenizer(), toy_rows(256)
    labels = label_set(rows, "label", "toy")
    model = build_model(Transformer(CONFIG), "classify", len(labels), "last")
    trainer = classify_trainer(model, tok, rows, labels, EarlyStopping("val_accuracy", "max"))
    result = trainer.fit()
    assert result.best_metrics["val_accuracy"] >= 0.98
    assert trainer.evaluate()["val_accuracy"] == result.best_metrics["val_accuracy"]  # the best weights are loaded


@pytest.mark.parametrize("pooling", ["mean", "mean_embed"])
def test_mean_pooling_also_learns(pooling):
    torch.manual_seed(0)
    tok, rows = word_tokenizer(), toy_rows(256)
    model = build_model(Transformer(CONFIG), "classify", 2, pooling)
    trainer = classify_trainer(model, tok, rows, ["animal", "colour"])
    trainer.fit()
    assert trainer.evaluate()["val_accuracy"] >= 0.95


def test_mean_embed_reads_the_mean_hidden_state_and_the_mean_input_embedding_at_unit_rms():
    torch.manual_seed(0)
    model = build_model(Transformer(CONFIG), "classify", 3, "mean_embed").eval()
    assert model.head.in_features == 2 * CONFIG.dim
    ids, lengths = torch.randint(3, CONFIG.vocab_size, (2, 6)), torch.tensor([6, 4])
    ids[1, 4:] = 0  # padding after the second row's 4 tokens
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        logits = model(input_ids=ids, lengths=lengths)
        for row, n in enumerate(lengths.tolist()):
            hidden = model.backbone.hidden_states(ids[row : row + 1, :n])[0].mean(0)
            words = model.backbone.embed(ids[row, :n]).mean(0)
            words = words / words.pow(2).mean().add(CONFIG.norm_eps).sqrt()
            torch.testing.assert_close(seen[0][row], torch.cat([hidden, words]))
        other = ids.clone()
        other[1, 4:] = 7  # what the padding holds changes nothing
        torch.testing.assert_close(model(input_ids=other, lengths=lengths), logits)


def test_label_smoothing_moves_the_classify_target_off_the_label_and_reaches_the_trainer():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2])
    model = lambda input_ids, lengths: logits  # noqa: E731 - the head's output as the loss sees it
    batch = {"input_ids": None, "lengths": None, "labels": labels}
    plain, n = task_spec("classify", 0).loss_fn(model, batch)
    smoothed, _ = task_spec("classify", 0, label_smoothing=0.2).loss_fn(model, batch)
    log_p = torch.log_softmax(logits, -1)
    expected = (0.8 * -log_p[[0, 1], labels] + 0.2 * -log_p.mean(-1)).sum()
    assert int(n) == 2 and smoothed > plain
    torch.testing.assert_close(smoothed, expected)
    # finetune.label_smoothing is what the stage's trainer minimizes
    tok, rows = word_tokenizer(), toy_rows(16)
    data = {"train": classify_data(tok, rows[:12], ["animal", "colour"]),
            "val": classify_data(tok, rows[12:], ["animal", "colour"]), "labels": ["animal", "colour"]}
    setup = recipe.Setup(Transformer(CONFIG), CONFIG, Path("unused"), "<pad>", special_ids(tok)[1], data)
    params = Params(finetune=FinetuneParams(label_smoothing=0.2, max_length=16, micro_batch_size=4))
    trainer = recipe.build_trainer(build_model(setup.backbone, "classify", 2, "mean"), params, setup,
                                   DistInfo(0, 1, 0, torch.device("cpu"), True), on_metrics=None, checkpoint_dir=None)
    torch.testing.assert_close(trainer.loss_fn(model, batch)[0], expected)


def test_frozen_method_trains_only_the_head():
    torch.manual_seed(0)
    tok, rows = word_tokenizer(), toy_rows(128)
    model = apply_method(build_model(Transformer(CONFIG), "classify", 2), "frozen", "classify")
    before = copy.deepcopy(model.backbone.state_dict())
    head_before = model.head.weight.detach().clone()
    classify_trainer(model, tok, rows, ["animal", "colour"], max_steps=3).fit()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(head_before, model.head.weight)
    trainable, total = count_params(model)
    assert trainable == 32 * 2 + 2 and total > trainable


def test_lora_trains_only_adapters_and_head_and_the_merged_model_gives_the_same_logits():
    torch.manual_seed(0)
    tok, rows = word_tokenizer(), toy_rows(128)
    base = build_model(Transformer(CONFIG), "classify", 2)
    frozen_before = {k: v.clone() for k, v in base.backbone.state_dict().items()}
    model = apply_method(base, "lora", "classify", LoraParams(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".head." in n for n in trainable)
    classify_trainer(model, tok, rows, ["animal", "colour"], max_steps=4, lr=1e-2).fit()
    # Base weights bitwise unchanged (peft keeps them under base_layer).
    for name, value in model.base_model.model.backbone.state_dict().items():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(frozen_before[original], value), name
    batch = classify_collate(1)(classify_data(tok, rows[:8], ["animal", "colour"]))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"], lengths=batch["lengths"])
        plain = merged_model(model)
        merged = plain(input_ids=batch["input_ids"], lengths=batch["lengths"])
    assert type(plain).__name__ == "SequenceClassifier"
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_lora_target_that_does_not_exist_names_the_available_layers():
    model = build_model(Transformer(CONFIG), "sft")
    with pytest.raises(LmforgeError, match=r"nope.*down_proj.*q_proj"):
        apply_method(model, "lora", "sft", LoraParams(target_modules=["q_proj", "nope"]))


def test_sft_targets_ignore_the_prompt_and_the_padding_exactly():
    tok = word_tokenizer()
    eos, pad = special_ids(tok)
    rows = encode_sft(tok, ["ask why", "ask how the"], ["red", "cat dog"], 16, "\n", eos)
    assert [n for _, n in rows] == [2, 3]
    batch = task_spec("sft", pad).collate(rows)
    ids0, ids1 = rows[0][0], rows[1][0]  # [ask why red EOS], [ask how the cat dog EOS]
    assert batch["inputs"].tolist() == [ids0[:-1] + [pad, pad], ids1[:-1]]
    assert batch["targets"].tolist() == [
        [IGNORE_INDEX, ids0[2], eos, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, IGNORE_INDEX, ids1[3], ids1[4], eos],
    ]


def test_sft_truncation_keeps_part_of_the_prompt_and_the_start_of_the_response():
    tok = word_tokenizer()
    eos, _ = special_ids(tok)
    ((ids, n_prompt),) = encode_sft(tok, ["ask why how the a of"], ["red green blue cyan pink gold"], 8, "\n", eos)
    assert len(ids) == 8 and n_prompt == 4
    assert tok.decode(ids) == "how the a of red green blue cyan"


def test_unseen_test_label_is_an_error_naming_the_file_the_label_and_the_fix():
    with pytest.raises(LmforgeError, match=r"test\.jsonl.*'bird'.*add training rows"):
        check_labels([{"label": "cat"}, {"label": "bird"}], ["cat", "dog"], "label", "test.jsonl")


def test_one_class_or_empty_training_set_is_an_error():
    with pytest.raises(LmforgeError, match="at least two labels"):
        label_set([{"label": "x"}, {"label": "x"}], "label", "train.jsonl")
    with pytest.raises(LmforgeError, match="no training rows"):
        label_set([], "label", "train.jsonl")


def test_missing_field_names_the_file_and_the_params_key(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("body,label\nhello,a\n")
    with pytest.raises(LmforgeError, match=r"train\.csv.*'text'.*finetune\.text_field"):
        read_examples(path, FinetuneParams(train_file=str(path)))


def test_split_is_stable_and_uses_the_text_when_there_is_no_id():
    rows = [{"text": f"row {i}"} for i in range(400)]
    train, val = split_train_val(rows, 0.1, "text")
    assert 20 < len(val) < 60 and len(train) + len(val) == 400
    assert split_train_val(list(reversed(rows)), 0.1, "text")[1] == list(reversed(val))


def test_early_stopping_stops_after_patience_evals_without_improvement_on_every_metric_name():
    torch.manual_seed(0)
    tok, rows = word_tokenizer(), toy_rows(128)
    model = build_model(Transformer(CONFIG), "classify", 2)
    trainer = classify_trainer(model, tok, rows, ["animal", "colour"], max_steps=20, eval_every=1,
                               early_stopping=EarlyStopping("flat", "max", patience=2))
    trainer.eval_fn = lambda m, b: {"flat": (1.0, 1.0)}  # never improves after the first eval
    result = trainer.fit()
    assert result.stopped_early and result.step == 3 and result.best_step == 1


def test_two_fine_tunes_of_a_tiny_config_write_byte_identical_model_files(tmp_path):
    """DVC hashes the bytes: the same weights must give the same file, every time (safetensors
    writes its metadata map in a per-process hash order, so several saves would differ)."""
    import hashlib

    tok, rows = word_tokenizer(tmp_path / "tokenizer.json"), toy_rows(64)
    meta = {"task": "classify", "method": "full", "labels": ["animal", "colour"], "pooling": "mean",
            "max_length": 16, "prompt_separator": "\n"}
    digests = set()
    for i in range(2):
        torch.manual_seed(0)
        model = build_model(Transformer(CONFIG), "classify", 2, "mean")
        classify_trainer(model, tok, rows, meta["labels"], max_steps=2).fit()
        for j in range(4):
            out = tmp_path / f"out{i}{j}"
            save_finetuned(model, CONFIG, out, meta, tokenizer_path=tmp_path / "tokenizer.json")
            digests.add(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_classifier_save_and_load_give_identical_predictions(tmp_path):
    torch.manual_seed(0)
    tok, rows = word_tokenizer(tmp_path / "tokenizer.json"), toy_rows(128)
    labels = ["animal", "colour"]
    model = build_model(Transformer(CONFIG), "classify", 2, "mean")
    classify_trainer(model, tok, rows, labels, max_steps=3).fit()
    meta = {"task": "classify", "method": "full", "labels": labels, "pooling": "mean", "max_length": 16,
            "prompt_separator": "\n"}
    save_finetuned(model, CONFIG, tmp_path / "out", meta, tokenizer_path=tmp_path / "tokenizer.json")
    loaded = load_finetuned(tmp_path / "out")
    in_memory = FinetunedModel(model, CONFIG, meta, tok)
    texts = [r["text"] for r in rows[:40]]
    assert loaded.task == "classify" and loaded.labels == labels
    assert torch.equal(loaded.predict_logits(texts), in_memory.predict_logits(texts))
    # Another batching pads differently: the same predictions up to float rounding.
    torch.testing.assert_close(loaded.predict_logits(texts, batch_size=7), in_memory.predict_logits(texts))
    assert loaded.predict(texts) == in_memory.predict(texts)
    torch.testing.assert_close(loaded.predict_proba(texts).sum(-1), torch.ones(40))


def sft_rows(tok, n=128):
    """'ask <colour>' -> its animal: learnable from the prompt alone."""
    eos, _ = special_ids(tok)
    rng = random.Random(0)
    prompts = [f"ask {rng.choice(GROUP_A)}" for _ in range(n)]
    responses = [GROUP_B[GROUP_A.index(p.split()[1])] for p in prompts]
    return encode_sft(tok, prompts, responses, 16, "\n", eos)


SFT_META = {"task": "sft", "method": "full", "labels": None, "pooling": "last", "max_length": 16, "prompt_separator": "\n"}


def test_sft_learns_the_responses_and_the_saved_model_generates_them(tmp_path):
    torch.manual_seed(0)
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    rows, spec = sft_rows(tok), task_spec("sft", special_ids(tok)[1])
    model = build_model(Transformer(CONFIG), "sft")
    trainer = Trainer(model, cfg(max_steps=40, lr=1e-2), Examples(rows[:96], rows[96:], spec.collate, 16),
                      loss_fn=spec.loss_fn)
    before = trainer.evaluate()["val_loss"]
    trainer.fit()
    assert trainer.evaluate()["val_loss"] < before / 4
    save_finetuned(model, CONFIG, tmp_path / "out", SFT_META, tokenizer_path=tmp_path / "tokenizer.json")
    loaded, in_memory = load_finetuned(tmp_path / "out"), FinetunedModel(model, CONFIG, SFT_META, tok)
    prompts = ["ask red", "ask gold"]
    assert loaded.generate(prompts, max_new_tokens=4) == in_memory.generate(prompts, max_new_tokens=4) == ["cat", "ant"]
    loss, n = loaded.lm_loss(prompts, ["cat", "ant"])
    assert n == 4 and loss / n < 1.0 and (loss, n) == in_memory.lm_loss(prompts, ["cat", "ant"])
    with pytest.raises(LmforgeError, match="classify"):
        loaded.predict(["red"])


def test_sft_lora_keeps_the_base_and_exports_merged_weights_plus_the_adapter(tmp_path):
    torch.manual_seed(0)
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    rows, spec = sft_rows(tok), task_spec("sft", special_ids(tok)[1])
    base = build_model(Transformer(CONFIG), "sft")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_method(base, "lora", "sft", LoraParams(r=4, alpha=8, dropout=0.0))
    trainer = Trainer(model, cfg(max_steps=5, lr=1e-2), Examples(rows[:96], rows[96:], spec.collate, 16),
                      loss_fn=spec.loss_fn)
    first = trainer.evaluate()["val_loss"]
    trainer.fit()
    assert trainer.evaluate()["val_loss"] < first
    for name, value in model.base_model.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(before[name.replace(".base_layer", "")], value), name
    batch = spec.collate(rows[:8])
    model.eval()
    with torch.no_grad():
        adapted = model(batch["inputs"])
        model.save_pretrained(tmp_path / "adapter")
        plain = merged_model(model)
        torch.testing.assert_close(plain(batch["inputs"]), adapted, atol=1e-5, rtol=1e-5)
    meta = {**SFT_META, "method": "lora"}
    save_finetuned(plain, CONFIG, tmp_path / "out", meta, tokenizer_path=tmp_path / "tokenizer.json",
                   adapter_dir=tmp_path / "adapter")
    assert (tmp_path / "out/adapter/adapter_config.json").is_file()
    assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file()
    loaded = load_finetuned(tmp_path / "out")
    prompts, responses = ["ask red", "ask pink the"], ["cat", "owl bee"]
    assert loaded.lm_loss(prompts, responses) == FinetunedModel(plain, CONFIG, meta, tok).lm_loss(prompts, responses)
