"""Helpers: a tiny random Llama with a tiny BPE tokenizer and a SmolLM-style chat template.

Everything is built offline in a few seconds; the tokenizer is trained on the bundled tasks'
text, so encoded examples are short.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_base(path: Path, vocab_size: int = 512, hidden: int = 64, layers: int = 2) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from trainer.tasks import TASKS, task_split

    corpus = []
    for name in TASKS:
        for row in task_split(name, "train", 300):
            corpus += [row["prompt"], row["completion"]]
    corpus += ["system", "user", "assistant", "You are a tiny test model", "Hello there!"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",  # pad == eos, as in SmolLM2
    )
    fast.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    fast.save_pretrained(str(path))
    return path


def base_overrides(tiny_base: Path, tmp_path: Path, **extra) -> dict:
    """Config values for a fast run on the tiny model."""
    d = {
        "base_model": str(tiny_base), "task": "date_iso", "task_train_size": 32,
        "output_dir": str(tmp_path / "adapters" / "out"), "run_dir": str(tmp_path / "run"),
        "batch_size": 4, "max_steps": 4, "eval_every": 2, "save_every": 2, "log_every": 2,
        "eval_generate_max": 4, "max_new_tokens": 8, "tensorboard": False,
        "progress_bar": False, "max_eval_examples": 8,
    }
    d.update(extra)
    return d


def same_adapter_tolerance(lr: float, steps: int) -> float:
    """How far two runs that see the same global batches may leave an adapter's weights
    apart when they sum the gradients in another order (micro-batches, ranks): fp32
    rounding of about 1e-7 of each sum, which Adam's per-element normalisation can turn into
    a visible change of the update where a gradient element is near zero. A real difference
    of the batches (tokens weighted wrongly, a batch seen twice) moves weights by a fair part
    of `lr` a step; this allows a thousandth of the most Adam can move a weight."""
    return 1e-3 * lr * steps


REPO = Path(__file__).resolve().parents[2]


def run_trainer(cmd: list[str], cwd: Path, timeout: float) -> None:
    """Run a trainer (or torchrun) command line from the repository's code, one OpenMP
    thread per process; fail the test with its stderr tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
