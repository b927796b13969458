"""The lean loss trains on exactly what TRL's SFTTrainer trains on: same loss, same gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F

from qlora_studio.config import DataConfig
from qlora_studio.data import prepare_training_data
from qlora_studio.lean_loss import install_lean_head, lean_trainer_class, nll_sum


def test_chunked_sum_equals_cross_entropy_with_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    expected = F.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")
    want = torch.autograd.grad(expected, (hidden, weight, bias))
    for chunk_logits in (50 * 37, 50 * 5, 50):  # one chunk, several (checkpointed), one row each
        got = nll_sum(hidden, weight, bias, targets, chunk_logits=chunk_logits)
        grads = torch.autograd.grad(got, (hidden, weight, bias))
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        for g, w in zip(grads, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def _tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True))


def _trainer(cls, model, dataset, tokenizer, tmp_path, padding_free):
    from peft import LoraConfig
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, report_to="none", use_cpu=True,
                     bf16=False, dataset_num_proc=None, padding_free=padding_free, max_length=None if padding_free
                     else 256, seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_lean_trainer_matches_trl_loss_gradients_and_token_count(tmp_path, embedded_tokenizer, padding_free):
    from trl import SFTTrainer

    data = prepare_training_data(DataConfig(source="sample:persona", eval_fraction=0), embedded_tokenizer, seed=0,
                                 completion_only_loss=True)
    dataset = data.train.select(range(12))
    model = _tiny_model(embedded_tokenizer)
    results = {}
    for name, cls in (("trl", SFTTrainer), ("lean", lean_trainer_class())):
        trainer = _trainer(cls, copy.deepcopy(model), dataset, embedded_tokenizer, tmp_path / name, padding_free)
        if name == "lean":
            assert trainer.lean
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(6)]))
        assert ("attention_mask" not in batch) == padding_free
        labels = batch["labels"]
        assert 0 < int((labels != -100).sum()) < labels.numel() / 2  # loss on the answers only: most positions don't count
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results[name] = (loss.item(), grads, trainer._metrics["train"]["num_tokens"])

    trl_loss, trl_grads, trl_tokens = results["trl"]
    lean_loss, lean_grads, lean_tokens = results["lean"]
    assert lean_loss == pytest.approx(trl_loss, rel=1e-5)
    assert lean_tokens == trl_tokens
    assert trl_grads.keys() == lean_grads.keys() and len(trl_grads) > 0
    for name, grad in trl_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_models_that_scale_their_logits_keep_trl_loss(embedded_tokenizer):
    model = _tiny_model(embedded_tokenizer)
    model.config.final_logit_softcapping = 30.0  # as Gemma 2: logits are not a plain projection
    forward = model.forward
    assert install_lean_head(model) is False
    assert model.forward == forward
