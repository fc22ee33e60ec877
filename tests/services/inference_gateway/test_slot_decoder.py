"""The slot decoder computes the model's own logits, whatever rows join and leave."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.modeling import llama_config, qwen2_config
from services.inference_gateway.engines.slot_decoder import SlotDecoder

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here"))]


def _model(make_config, device: str):
    torch.manual_seed(0)
    config = make_config(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                         intermediate_size=128, seq_len=64, eos_token_id=0, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def _reference(model, sequences: list[list[int]]) -> torch.Tensor:
    """Each sequence alone through the model's own forward: its next-token logits."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return torch.stack([model(input_ids=torch.tensor([s], device=device)).logits[0, -1]
                            for s in sequences]).float().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_config", [llama_config, qwen2_config], ids=["llama", "qwen2"])
def test_prefill_and_decode_match_the_models_forward_as_rows_join_and_leave(make_config,
                                                                             device):
    model = _model(make_config, device)
    decoder = SlotDecoder(model, max_rows=4, initial_length=4)  # forces the cache to grow
    sequences = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]
    logits = decoder.prefill(sequences)
    torch.testing.assert_close(logits, _reference(model, sequences), atol=1e-4, rtol=1e-4)
    for step in range(12):
        tokens = [int(t) for t in logits.argmax(-1)]
        for sequence, token in zip(sequences, tokens, strict=True):
            sequence.append(token)
        if step == 3:  # row 0 finishes: the last row moves into its place
            decoder.release(0)
            sequences[0], tokens[0] = sequences.pop(), tokens.pop()
        if step == 5:  # a new request joins the running batch
            joined = [30, 31, 32, 33, 34]
            first = decoder.prefill([joined])
            torch.testing.assert_close(first, _reference(model, [joined]), atol=1e-4,
                                       rtol=1e-4)
            sequences.append([*joined, int(first.argmax())])
            tokens.append(int(first.argmax()))
        logits = decoder.decode(tokens)
        torch.testing.assert_close(logits, _reference(model, sequences), atol=1e-4, rtol=1e-4)
    assert decoder.rows == 3 and decoder.capacity >= max(len(s) for s in sequences)


def test_other_architectures_are_refused_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="runs \\('llama', 'qwen2'\\) models"):
        SlotDecoder(model, max_rows=2)
