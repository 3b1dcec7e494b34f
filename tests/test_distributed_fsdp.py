"""fp8train.distributed.fsdp pieces that need no process group: layer discovery and clear errors."""

from __future__ import annotations

import pytest
import torch.nn as nn
import transformers

import fp8train
import fp8train.distributed as fd


def test_decoder_layers_of_a_converted_hf_model():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = fp8train.convert(transformers.LlamaForCausalLM(cfg), recipe="coat")
    assert fd.decoder_layers(model) == list(model.model.layers)


def test_decoder_layers_fall_back_to_the_longest_module_list():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(4, 4)])
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    net = Net()
    assert fd.decoder_layers(net) == list(net.blocks)
    with pytest.raises(ValueError, match="layers="):
        fd.decoder_layers(nn.Linear(4, 4))


def test_shard_model_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_distributed"):
        fd.shard_model(nn.Sequential(nn.Linear(4, 4)))
    assert fd.world_size() == 1 and fd.rank() == 0 and not fd.is_sharded(nn.Linear(4, 4))
