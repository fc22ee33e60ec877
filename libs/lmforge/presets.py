"""Model size presets, shared by the scheduler (to plan) and the trainer (to build).

One table, so the model the scheduler priced is the model the trainer builds
and the benchmarks measure. No torch here: the scheduler runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelPreset:
    """A named Llama shape, the peak learning rate it trains well at, and the batch
    the service gives it by default."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    learning_rate: float
    seq_len: int = 128
    """data-prep's default context (LMFORGE_DATAPREP_SEQ_LEN)."""
    micro_batch: int = 16
    """Sequences per optimizer step the planner keeps by default (the global batch: micro-batch
    x accumulation x devices), and the trainer's micro-batch for `TrainConfig.from_preset`."""
    warmup_steps: int = 10

    def parameters(self, vocab_size: int) -> int:
        """Llama parameter count with untied embeddings."""
        h, i, layer_count = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        return 2 * vocab_size * h + layer_count * per_layer + h

    def flops_per_token(self, vocab_size: int, seq_len: int) -> float:
        """Training FLOPs per token: 6·N for the weights plus attention's 12·L·H·T."""
        return 6 * self.parameters(vocab_size) + 12 * self.num_layers * self.hidden_size * seq_len


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(name="tiny", hidden_size=128, num_layers=4, num_heads=4,
                    intermediate_size=352, learning_rate=3e-3),
        ModelPreset(name="small", hidden_size=256, num_layers=6, num_heads=8,
                    intermediate_size=704, learning_rate=1.5e-3),
        ModelPreset(name="base", hidden_size=512, num_layers=8, num_heads=8,
                    intermediate_size=1408, learning_rate=8e-4),
        ModelPreset(name="124m", hidden_size=768, num_layers=12, num_heads=12,
                    intermediate_size=2048, learning_rate=6e-4),
        ModelPreset(name="350m", hidden_size=1024, num_layers=24, num_heads=16,
                    intermediate_size=2816, learning_rate=3e-4),
        ModelPreset(name="1b", hidden_size=2048, num_layers=16, num_heads=32,
                    intermediate_size=5632, learning_rate=3e-4),
        # Llama-2-7B's shape (Touvron et al. 2023), for planning at that scale.
        ModelPreset(name="7b", hidden_size=4096, num_layers=32, num_heads=32,
                    intermediate_size=11008, learning_rate=3e-4),
        # The test suite's model: small enough that a few steps take a second on a CPU.
        ModelPreset(name="test-tiny", hidden_size=64, num_layers=2, num_heads=4,
                    intermediate_size=160, learning_rate=3e-3, seq_len=64, micro_batch=8,
                    warmup_steps=2),
    )
}
"""Presets by name: `LMFORGE_SCHEDULER_PRESET` and `TrainConfig.from_preset`."""
