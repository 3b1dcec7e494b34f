"""The trainer's evaluation on an FSDP2-sharded model sees the current weights.

FSDP2 keeps the root unit's weights (embeddings, final norm, head: ``reshard_after_forward=False``) gathered after
a forward that has no backward.  A later forward reuses them -- after optimizer steps had changed the shards --
unless something reshards them; in eager training the next backward does, but with ``--cuda-graph`` no eager
backward ever runs, so every evaluation after the first one read the first one's root weights."""

import subprocess
import sys
import textwrap


def test_evaluation_after_the_shards_changed_uses_the_new_weights():
    script = textwrap.dedent("""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        import fp8train.distributed as fd
        from fp8train.train.loop import evaluate

        def build():
            torch.manual_seed(0)
            config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=97, max_position_embeddings=64)
            return LlamaForCausalLM(config)

        def halve(params):  # stands in for an optimizer step: every parameter it holds changes in place
            with torch.no_grad():
                for p in params:
                    (p.to_local() if hasattr(p, "to_local") else p).mul_(0.5)

        fd.init_distributed(backend="gloo")
        batches = [torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        sharded, reference = fd.shard_model(build()), build()
        optimized = [list(m.parameters()) for m in (sharded, reference)]  # what an optimizer holds: the shards
        before = evaluate(sharded, batches, torch.device("cpu"), False)
        assert abs(before - evaluate(reference, batches, torch.device("cpu"), False)) < 1e-5
        halve(optimized[0])
        halve(optimized[1])
        after, expected = (evaluate(m, batches, torch.device("cpu"), False) for m in (sharded, reference))
        print("losses", before, after, expected)
        assert abs(after - expected) < 1e-5, (after, expected)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.stdout + result.stderr)[-2500:]
