"""LoRA against full fine-tuning from the same base, same data and steps, measured.

1. Data: the shipped fortunes sample (or `--data`), prepared by data-prep's own
   code with a trained tokenizer.
2. Base: the trainer's `--preset` (default `small`) trained from scratch for
   `--base-steps` by the trainer's own code, saved as a Hugging Face directory:
   the model a later run adapts (`--base-model`).
3. The two adaptations, each in a child process of its own (peak RSS is a
   per-process high-water mark): the dataset re-tokenized with the base's
   tokenizer, then `--steps` steps of full fine-tuning and of LoRA (rank
   `--rank`, every projection) at the learning rates the planner gives each.
   Reported per mode: held-out perplexity of the saved (merged) model, training
   tokens/s, peak RSS, and the size of one checkpoint.
4. Memory at the 124M preset: a random 124M base saved as an HF directory, a few
   steps of each mode (micro-batch `--micro-batch-124m`), with and without
   gradient checkpointing. Two peaks each: training (the trainer's
   `peak_memory_bytes`: VmHWM reset when the loop starts, read after the last
   step) and the process's (getrusage: the base's load and, for LoRA, the merge
   into a second copy of the base at export, and the held-out evaluation).

   What the LoRA training peak is made of (124M preset, vocabulary 2048, 88M
   parameters, micro-batch 2 x 128 tokens, fp32 on the CPU): ~240 MiB of interpreter
   and libraries before the model, ~180 MiB more once the trainer is built, 330 MiB
   of frozen weights, the tensors saved for backward (counted with autograd's
   saved-tensor hooks: 171 MiB, against full fine-tuning's 190 MiB, whose norms'
   weights need their inputs too; the frozen projections save none, the logits are
   2 MiB) and what the allocator keeps between steps. Full fine-tuning adds the
   gradients and AdamW's two moments (3 x 330 MiB). LoRA's dropout, when asked for
   (`lora_dropout`, default 0), adds a dropped copy and a mask of every target's
   input: 283 MiB saved, and the training peak 0.64x full's instead of 0.55x.
   Gradient checkpointing takes LoRA to ~0.5x.

5. Chat (`--chat`, alone with `--chat-only`): synthetic conversations of varied length
   (arithmetic questions, answers of 1-12 sentences) prepared by data-prep with the
   chat template of a small random Llama base with ChatML specials (the test
   fixture's): perplexity on held-out assistant tokens before and after
   `--chat-steps` packed steps, and trained tokens/s (non-padding tokens through a
   full optimizer step) packed with the per-conversation mask vs unpacked.

    python benchmarks/finetune.py [--preset small] [--base-steps 150] [--steps 40]
    python benchmarks/finetune.py --memory-only [--lora-dropout 0.05]
    python benchmarks/finetune.py --chat-only [--chat-steps 30] [--chat-seq-len 256]

Prints JSON and writes it to `--out` (benchmarks/results/finetune.json); `--memory-only`
runs step 4 alone. Targets (issue 14): LoRA checkpoint <= 5% of full; LoRA peak training
memory <= 0.6x full at 124M. Measure alone: two busy cores slow training 10-15x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "fortunes-sample.txt"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(data: Path, out: Path, seq_len: int, base: Path | None = None) -> Path:
    from lmforge.base_models import inspect_base_model
    from services.data_prep.prepare import PrepConfig, prepare_dataset

    info = inspect_base_model(str(base), [base.parent]) if base else None
    prepare_dataset(data, "text" if data.suffix == ".txt" else "auto", "", out,
                    PrepConfig.hygiene_only(vocab_size=2048, seq_len=seq_len), base=info)
    return out


def train_base(args: argparse.Namespace, work: Path) -> Path:
    """A from-scratch model trained by the trainer's code, saved as an HF directory."""
    from lmforge.artifacts import ArtifactStore
    from services.trainer.checkpoints import CheckpointIndex
    from services.trainer.config import TrainConfig
    from services.trainer.training import Trainer

    store = ArtifactStore(work / "artifacts")
    dataset = prepare(args.data, work / "scratch-ds", args.seq_len)
    config = TrainConfig.from_preset(args.preset, max_steps=args.base_steps,
                                     checkpoint_interval=10**6, seq_len=args.seq_len,
                                     micro_batch=args.micro_batch)
    result = Trainer(config, dataset, store, CheckpointIndex(work / "ck", "base", store)).run()
    assert result.model_dir is not None
    return result.model_dir


def random_base(preset: str, work: Path, vocab_from: Path) -> Path:
    """A random `preset` model saved as an HF directory with `vocab_from`'s tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.modeling import llama_config
    from lmforge.presets import PRESETS

    p = PRESETS[preset]
    meta = json.loads((vocab_from / "config.json").read_text())
    config = llama_config(vocab_size=meta["vocab_size"], hidden_size=p.hidden_size,
                          num_layers=p.num_layers, num_heads=p.num_heads,
                          intermediate_size=p.intermediate_size, seq_len=1024,
                          eos_token_id=meta["eos_token_id"], pad_token_id=meta["pad_token_id"])
    torch.manual_seed(0)
    out = work / f"random-{preset}"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (vocab_from / name).exists():
            shutil.copy2(vocab_from / name, out / name)
    return out


def adapt_once(args: argparse.Namespace) -> dict:
    """One adaptation (`--one full|lora`) in this process: the figures as a dict."""
    import threading

    from lmforge.artifacts import ArtifactStore
    from services.scheduler.adaptation import FULL_LEARNING_RATE, LORA_LEARNING_RATE
    from services.trainer.checkpoints import CheckpointIndex
    from services.trainer.config import TrainConfig
    from services.trainer.training import Trainer

    work = Path(tempfile.mkdtemp(prefix=f"ft-{args.one}-"))
    store = ArtifactStore(work / "artifacts")
    dataset = prepare(args.data, work / "ds", args.seq_len, args.base)
    lora = args.one == "lora"
    config = TrainConfig.from_preset(
        args.preset, max_steps=args.steps, checkpoint_interval=max(1, args.steps - 1),
        seq_len=args.seq_len, micro_batch=args.micro_batch, pretrained_dir=args.base,
        adapter_kind=args.one, rank=args.rank, alpha=2.0 * args.rank,
        **({} if args.lora_dropout is None else {"dropout": args.lora_dropout}),
        learning_rate=LORA_LEARNING_RATE if lora else FULL_LEARNING_RATE,
        gradient_checkpointing=args.gradient_checkpointing)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer = Trainer(config, dataset, store, CheckpointIndex(work / "ck", "ft", store))
    checkpoints: list[str] = []
    rates: list[float] = []
    result = trainer.run(stop=threading.Event(), progress_every_s=0.0,
                         on_checkpoint=lambda ref: checkpoints.append(ref.digest),
                         on_progress=lambda p: rates.append(p.tokens_per_second))
    assert result.model_dir is not None and checkpoints
    steady = sorted(rates[1:] or rates)  # the first step pays warm-up
    return {
        "mode": args.one, "steps": result.step,
        "heldout_perplexity": round(result.heldout_perplexity, 3),
        "train_tokens_per_s": round(steady[len(steady) // 2], 1),
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_dropout": config.adapter.dropout if lora else None,
        "training_peak_rss_mb": round(result.peak_memory_bytes / 2**20, 1),
        "process_peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20, 1),
        "rss_before_training_mb": round(rss_before / 2**20, 1),
        "checkpoint_bytes": _dir_bytes(store.get_dir(checkpoints[-1])),
        "parameters": result.parameters, "trainable_parameters": result.trainable_parameters,
        "adapter_bytes": _dir_bytes(result.model_dir / "adapter") if lora else 0,
    }


def chat_conversations(n: int) -> list[dict]:
    """Deterministic conversations whose lengths vary ~10x, as real chat data does."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        answer = " ".join(f"Step {k}: {a} plus {b} is {a + b}." for k in
                          range(1, rng.randint(1, 12) + 1))
        rows.append({"messages": [
            {"role": "system", "content": "You add numbers and show the steps."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": answer}]})
    return rows


def chat_figures(args: argparse.Namespace) -> dict:
    """Assistant-token perplexity before/after packed training; packed vs unpacked speed."""
    import time

    sys.path.insert(0, str(REPO))
    import torch

    from lmforge.artifacts import ArtifactStore
    from lmforge.base_models import inspect_base_model
    from lmforge.modeling import load_causal_lm, load_loss_mask, load_token_stream
    from services.data_prep.prepare import PrepConfig, prepare_dataset
    from services.trainer.checkpoints import CheckpointIndex
    from services.trainer.config import TrainConfig
    from services.trainer.conversations import IGNORE_INDEX, assistant_perplexity
    from services.trainer.training import Trainer, load_document_index
    from tests.base_model_fixtures import save_base_model

    work = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    base_dir = save_base_model(work / "base", "llama")
    base = inspect_base_model(str(base_dir), [work])
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_conversations(600)))
    store = ArtifactStore(work / "artifacts")
    report: dict = {"conversations": 600, "seq_len": args.chat_seq_len,
                    "micro_batch": args.micro_batch, "base": "random tiny Llama, ChatML"}
    datasets = {}
    for packing in ("packed", "unpacked"):
        datasets[packing] = work / f"ds-{packing}"
        prepare_dataset(data, "", "", datasets[packing],
                        PrepConfig.hygiene_only(seq_len=args.chat_seq_len), base=base,
                        packing=packing)

    def config(steps: int) -> TrainConfig:
        return TrainConfig.from_preset("test-tiny", max_steps=steps,
                                       checkpoint_interval=10**6, seq_len=args.chat_seq_len,
                                       micro_batch=args.micro_batch, pretrained_dir=base_dir,
                                       learning_rate=2e-3)

    ds = datasets["packed"]
    heldout = load_token_stream(ds, "heldout")
    index = load_document_index(ds, "heldout")
    assert index is not None
    before = assistant_perplexity(load_causal_lm(base_dir), heldout,
                                  load_loss_mask(ds, "heldout"), index.offsets,
                                  seq_len=args.chat_seq_len)
    trained = Trainer(config(args.chat_steps), ds, store,
                      CheckpointIndex(work / "ck", "chat", store)).run()
    report["assistant_perplexity"] = {"before": round(before, 3),
                                      "after": round(trained.assistant_perplexity, 3),
                                      "steps": args.chat_steps}
    speed = {}
    for packing, path in datasets.items():
        trainer = Trainer(config(10**6), path, store,
                          CheckpointIndex(work / "ck", f"speed-{packing}", store))
        trainer.engine.train_step([trainer.micro_batch(0, 0)])  # warm-up
        real = targets = 0
        started = time.perf_counter()
        for step in range(1, args.chat_speed_steps + 1):
            batch = trainer.micro_batch(step, 0)
            trainer.engine.train_step([batch])
            assert not isinstance(batch, torch.Tensor)
            real += int((batch.input_ids != trainer.pad_token_id).sum())
            targets += int((batch.labels != IGNORE_INDEX).sum())
        seconds = time.perf_counter() - started
        positions = args.chat_speed_steps * args.micro_batch * args.chat_seq_len
        speed[packing] = {"tokens_per_s": round(real / seconds, 1),
                          "assistant_tokens_per_s": round(targets / seconds, 1),
                          "padding_share": round(1 - real / positions, 3),
                          "steps": args.chat_speed_steps}
    report["throughput"] = speed
    report["packed_speedup"] = round(speed["packed"]["tokens_per_s"]
                                     / speed["unpacked"]["tokens_per_s"], 2)
    return report


def _child(args: argparse.Namespace, mode: str, base: Path, preset: str, steps: int,
           micro_batch: int, *, checkpointing: bool = False) -> dict:
    command = [sys.executable, __file__, "--one", mode, "--base", str(base), "--preset",
               preset, "--steps", str(steps), "--micro-batch", str(micro_batch),
               "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--data",
               str(args.data)] + (["--gradient-checkpointing"] if checkpointing else []) + (
                   [] if args.lora_dropout is None else ["--lora-dropout", str(args.lora_dropout)])
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": f"{REPO / 'libs'}:{REPO}"})
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--micro-batch-124m", type=int, default=2)
    parser.add_argument("--steps-124m", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-dropout", type=float,
                        help="LoRA's adapter dropout (default: the trainer's, 0)")
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--chat", action="store_true", help="add the chat figures")
    parser.add_argument("--chat-only", action="store_true", help="only the chat figures")
    parser.add_argument("--chat-steps", type=int, default=30)
    parser.add_argument("--chat-speed-steps", type=int, default=8)
    parser.add_argument("--chat-seq-len", type=int, default=256)
    parser.add_argument("--memory-only", action="store_true",
                        help="only the 124M memory figures (step 4)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "results" / "finetune.json")
    parser.add_argument("--one", choices=("full", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(adapt_once(args)))
        return
    if args.chat_only:
        print(json.dumps({"chat": chat_figures(args)}, indent=1))
        return
    work = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    if args.memory_only:  # the base only lends its tokenizer to the random 124M model
        args.base_steps = min(args.base_steps, 2)
    base = train_base(args, work)
    report: dict = {"base": {"preset": args.preset, "steps": args.base_steps,
                             "seq_len": args.seq_len}}
    if not args.memory_only:
        same = {m: _child(args, m, base, args.preset, args.steps, args.micro_batch)
                for m in ("full", "lora")}
        full, lora = same["full"], same["lora"]
        report.update({
            "same_base": same,
            "lora_checkpoint_share": round(lora["checkpoint_bytes"]
                                           / full["checkpoint_bytes"], 4),
            "lora_tokens_per_s_ratio": round(lora["train_tokens_per_s"]
                                             / full["train_tokens_per_s"], 3)})
    big = random_base("124m", work, base)
    at_124m = {f"{m}{'+gc' if gc else ''}": _child(args, m, big, "124m", args.steps_124m,
                                                    args.micro_batch_124m, checkpointing=gc)
               for gc in (False, True) for m in ("full", "lora")}

    def ratio(lora: str, full: str, peak: str) -> float:
        return round(at_124m[lora][peak] / at_124m[full][peak], 3)

    report.update({
        "at_124m": at_124m,
        "lora_training_peak_ratio_124m": ratio("lora", "full", "training_peak_rss_mb"),
        "lora_training_peak_ratio_124m_both_checkpointed": ratio(
            "lora+gc", "full+gc", "training_peak_rss_mb"),
        "lora_checkpointed_vs_full_training_peak_ratio_124m": ratio(
            "lora+gc", "full", "training_peak_rss_mb"),
        "lora_process_peak_ratio_124m": ratio("lora", "full", "process_peak_rss_mb"),
        "targets": {"lora_checkpoint_share_max": 0.05, "lora_peak_memory_ratio_124m_max": 0.6},
    })
    if args.chat:
        report["chat"] = chat_figures(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
