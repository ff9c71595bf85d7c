"""The CPU loss-positions head gives trl's SFT loss, gradients and metrics unchanged (to 1e-5), on packed
(padding-free) and padded batches, in training and in evaluation; it steps aside where it would differ."""

from __future__ import annotations

import pytest
import torch

from sftdist import fast_head


def _trainer(model_dir, tmp_path, packing: bool, batch_size: int = 6, lengths=(40, 17, 63, 9, 28, 51)):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids, masks = [], []
    for n in lengths:
        ids.append(torch.randint(5, model.config.vocab_size - 1, (n,), generator=g).tolist())
        prompt = int(torch.randint(1, n - 1, (1,), generator=g))
        masks.append([0] * prompt + [1] * (n - prompt))
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_length=128, packing=packing, padding_free=packing,
        completion_only_loss=True, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        bf16=False, use_cpu=True, report_to="none",
    )
    data = Dataset.from_dict({"input_ids": ids, "completion_mask": masks})
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


def _loss_and_grads(trainer, batch, train: bool = True):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    model.train(train)
    inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.set_grad_enabled(train):
        loss = trainer.compute_loss(model, inputs, num_items_in_batch=None)
    if train:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: trainer._metrics["train" if train else "eval"][k][-1] for k in ("entropy", "mean_token_accuracy")}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_same_loss_gradients_and_metrics_as_trl_head(tiny_model, tmp_path, packing):
    trainer = _trainer(tiny_model, tmp_path, packing)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert ("position_ids" in batch) == packing and ("attention_mask" in batch) != packing
    if packing:  # one flat row of several packs: the backbone runs it as rows of at most max_length (128)
        assert batch["input_ids"].shape[0] == 1 and len(fast_head.row_spans(batch["position_ids"], 128)) >= 2
    labels = batch["labels"][:, 1:]
    assert 0 < int((labels != -100).sum()) < labels.numel()  # some positions carry no loss
    # Make every other loss position the model's top-1 prediction, so the accuracy metric is not trivially 0.
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        top1 = trainer.model(**inputs, use_cache=False).logits[:, :-1].argmax(-1)
    pick = (labels != -100) & (torch.arange(labels.shape[1]) % 2 == 0)
    labels[pick] = top1[pick]

    ref = _loss_and_grads(trainer, batch)
    ref_eval = _loss_and_grads(trainer, batch, train=False)
    assert fast_head.install(trainer) is True
    new = _loss_and_grads(trainer, batch)
    new_eval = _loss_and_grads(trainer, batch, train=False)

    assert new[0].item() == pytest.approx(ref[0].item(), abs=1e-5)
    assert new_eval[0].item() == pytest.approx(ref_eval[0].item(), abs=1e-5)
    assert new[1].keys() == ref[1].keys() and len(ref[1]) == len(list(trainer.model.parameters()))
    for name, g in ref[1].items():
        assert torch.allclose(new[1][name], g, atol=1e-5, rtol=1e-4), name
    for key in ("entropy", "mean_token_accuracy"):
        assert new[2][key] == pytest.approx(ref[2][key], abs=1e-5)


def test_a_batch_without_loss_positions_gives_a_zero_that_backpropagates(tiny_model, tmp_path):
    trainer = _trainer(tiny_model, tmp_path, packing=True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch["labels"][:] = -100
    assert fast_head.install(trainer)
    loss, grads, _ = _loss_and_grads(trainer, batch)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_large_batches_fall_back_to_trl_tiled_head(tiny_model, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model, tmp_path, packing=True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ref = _loss_and_grads(trainer, batch)
    monkeypatch.setattr(fast_head, "MAX_LOGITS_BYTES", 0)  # every batch is "too large" for the logits
    assert fast_head.install(trainer)
    new = _loss_and_grads(trainer, batch)
    assert new[0].item() == ref[0].item()  # the very same computation: trl's head


def test_models_whose_logits_are_transformed_keep_trl_head(tiny_model, tmp_path):
    trainer = _trainer(tiny_model, tmp_path, packing=True)
    trainer.model.config.final_logit_softcapping = 30.0  # Gemma-style: trl's head applies it, this one would not
    assert fast_head.supported(trainer.model) is False
    assert fast_head.install(trainer) is False


def test_row_spans_keep_samples_whole_and_in_order():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1, 0]])  # samples of 3, 2, 5, 2, 1 tokens
    assert fast_head.row_spans(pos, 5) == [(0, 5), (5, 10), (10, 13)]
    assert fast_head.row_spans(pos, 4) == [(0, 5), (5, 10), (10, 13)]  # a 5-token sample widens the rows to 5
    assert fast_head.row_spans(pos, 100) == [(0, 13)]


def test_one_sample_batches_train_and_evaluate(tiny_model, tmp_path):
    """Batch-1 training on long samples and a one-row eval set: a flat row that holds a single sample (it crashed
    in row_spans)."""
    trainer = _trainer(tiny_model, tmp_path, packing=True, batch_size=1, lengths=(100, 90))  # one per 128-token pack
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    length = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) == 1
    one_row = trainer.train_dataset.select([0])
    ref = _loss_and_grads(trainer, batch)
    ref_eval = trainer.evaluate(one_row)["eval_loss"]
    assert fast_head.install(trainer)
    new = _loss_and_grads(trainer, batch)
    assert new[0].item() == pytest.approx(ref[0].item(), abs=1e-5)
    for name, g in ref[1].items():
        assert torch.allclose(new[1][name], g, atol=1e-5, rtol=1e-4), name
    assert trainer.evaluate(one_row)["eval_loss"] == pytest.approx(ref_eval, abs=1e-5)
    assert fast_head.row_spans(batch["position_ids"], 16) == [(0, length)]
