"""DPO's numbers equal TRL's (trl 1.16) on the same batch, computed by TRL's own code.

Two random Llamas saved by transformers (a policy and a reference with other weights, so
that the rewards are not 0) are loaded by nnxtrain and by transformers. A batch of three
pairs whose prompts and replies all differ in length, collated by TRL's
`DataCollatorForPreference` (right padding; completion mask on the replies), goes through
TRL's `DPOTrainer._compute_loss` (its loss, and the four reward and two log-prob metrics
it logs) and `compute_ref_log_probs` (per-pair log-probs of any model), and through
nnxtrain's on its own models, laid out as a data=preference batch: `row_logps`, and the
train step's loss (`nnxtrain.train.preference.dpo_loss`).

Tolerances are the issue's: 1e-4 on per-pair log-probs, 1e-5 on the loss and the reward
metrics. The two stacks compute the same float32 forward in different orders; the
log-probs are sums of at most 9 terms of magnitude ~5, the losses and rewards smooth
functions of them scaled by beta <= 0.5.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import make_hf

import nnxtrain.hf
from nnxtrain.config import DpoConfig
from nnxtrain.prefs import row_logps
from nnxtrain.train.preference import dpo_loss

VOCAB = 128
# (prompt, chosen, rejected) lengths: every one differs, so a mask off by one shows
LENGTHS = [(3, 5, 2), (6, 1, 4), (2, 3, 7)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tmp = tmp_path_factory.mktemp("dpo")
    policy_dir, ref_dir = make_hf(tmp / "policy", seed=0), make_hf(tmp / "ref", seed=1)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t1", pad_token="t0")
    hf = {
        n: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        for n, d in (("policy", policy_dir), ("ref", ref_dir))
    }
    # float32 throughout: DPOConfig defaults to bf16 autocast
    args = DPOConfig(output_dir=str(tmp / "out"), report_to=[], use_cpu=True, bf16=False)
    data = Dataset.from_list([{"prompt": "t3", "chosen": "t4", "rejected": "t5"}])
    trainer = DPOTrainer(
        model=hf["policy"],
        ref_model=hf["ref"],
        args=args,
        train_dataset=data,
        processing_class=tok,
    )
    rng = np.random.default_rng(0)
    examples = [
        {
            k: rng.integers(2, VOCAB, n).tolist()
            for k, n in zip(("prompt_ids", "chosen_ids", "rejected_ids"), sizes, strict=True)
        }
        for sizes in LENGTHS
    ]
    collate = DataCollatorForPreference(pad_token_id=0)
    ours = {n: nnxtrain.hf.load(str(d)) for n, d in (("policy", policy_dir), ("ref", ref_dir))}
    return {"trainer": trainer, "examples": examples, "collate": collate, "ours": ours}


def our_batch(trl_batch: dict[str, torch.Tensor]) -> dict[str, jnp.ndarray]:
    """TRL's collated [chosen; rejected] rows as a data=preference batch: inputs and
    targets shifted by one, weights the completion mask at the targets."""
    ids, mask = trl_batch["input_ids"].numpy(), trl_batch["completion_mask"].numpy()
    return {
        "inputs": jnp.asarray(ids[:, :-1], jnp.int32),
        "targets": jnp.asarray(ids[:, 1:], jnp.int32),
        "weights": jnp.asarray(mask[:, 1:], jnp.float32),
    }


def trl_numbers(setup: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    trainer = setup["trainer"]
    trainer._metrics["train"].clear()
    trainer.model.train()
    loss = float(trainer._compute_loss(trainer.model, batch, False))
    return {"loss": loss} | {k: v[-1] for k, v in trainer._metrics["train"].items()}


def test_per_pair_log_probs_equal_trls(setup):
    batch = setup["collate"](setup["examples"])
    trainer = setup["trainer"]
    mine = our_batch(batch)
    for name, model in (("policy", trainer.model), ("ref", trainer.ref_model)):
        with torch.no_grad():
            chosen, rejected = trainer.compute_ref_log_probs(model, batch)
        theirs = np.concatenate([chosen.numpy(), rejected.numpy()])
        got = np.asarray(row_logps(setup["ours"][name], mine))
        print(f"{name} per-pair log-probs: max |ours - TRL| {np.max(np.abs(got - theirs)):.2e}")
        np.testing.assert_allclose(got, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "loss_type,beta,smoothing",
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.0),
        ("sigmoid", 0.1, 0.1),
        ("ipo", 0.1, 0.0),
        ("ipo", 0.5, 0.0),
    ],
)
def test_loss_and_metrics_equal_trls(setup, loss_type, beta, smoothing):
    trainer, examples, collate = setup["trainer"], setup["examples"], setup["collate"]
    batch = collate(examples)
    mine = our_batch(batch)
    # the train step's own loss (nnxtrain.train.preference.dpo_loss): the policy's forward,
    # the held reference's parameters, the reply lengths from the batch's weights
    graphdef, ref_params = nnx.split(setup["ours"]["ref"])
    cfg = DpoConfig(beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    sums = dpo_loss(cfg, graphdef, lora=False)(setup["ours"]["policy"], mine, ref_params)
    ours = {k: float(v / sums["weight"]) for k, v in sums.items() if k not in ("z", "weight")}
    trainer.beta, trainer.label_smoothing = beta, smoothing
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    theirs = trl_numbers(setup, batch)
    if smoothing:
        # TRL 1.16's sigmoid ignores label_smoothing; conservative DPO (TRL < 1.0's sigmoid
        # with it) is its `aot` loss on a batch of one pair (sorting one pair is nothing)
        trainer.loss_types = ["aot"]
        theirs["loss"] = float(
            np.mean([trl_numbers(setup, collate([e]))["loss"] for e in examples])
        )
    keys = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    print(
        f"{loss_type} beta {beta} ls {smoothing}: loss ours {ours['ce']:.7f} TRL "
        f"{theirs['loss']:.7f}; " + ", ".join(f"{k} {ours[k] - theirs[k]:+.1e}" for k in keys)
    )
    assert abs(ours["ce"] - theirs["loss"]) <= 1e-5
    for key in keys:
        assert abs(ours[key] - theirs[key]) <= 1e-5, key
    for key in ("logps/chosen", "logps/rejected"):
        assert abs(ours[key] - theirs[key]) <= 1e-4, key
    assert 0 < theirs["rewards/accuracies"] < 1  # the batch is not one-sided
