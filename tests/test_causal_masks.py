"""fp8train.causal_masks.plain_causal_batches: under tracing / graph capture transformers must take SDPA's
causal kernel (no mask tensor) for batches without position ids, with the same outputs; the patch is scoped."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
masking_utils = pytest.importorskip("transformers.masking_utils")
if not hasattr(masking_utils, "find_packed_sequence_indices"):
    pytest.skip("this transformers has no packed-sequence check", allow_module_level=True)

from fp8train.causal_masks import plain_causal_batches  # noqa: E402
from _export_models import tiny_llama  # noqa: E402


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Record (mask given?, is_causal) of every SDPA call."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        calls.append((mask is not None, bool(kwargs.get("is_causal", False))))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _model():
    model = tiny_llama(outliers=False)
    model.config._attn_implementation = "sdpa"
    return model


def _simulate_capture(monkeypatch):
    # what transformers sees while a CUDA graph is captured or dynamo traces: it may not read tensors
    monkeypatch.setattr(masking_utils, "is_tracing", lambda *args, **kwargs: True)


@pytest.mark.parametrize("use_cache", [False, True])  # without a cache transformers also checks for packing
def test_under_capture_the_causal_kernel_replaces_the_mask(monkeypatch, sdpa_calls, use_cache):
    model = _model()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=use_cache).logits
    assert sdpa_calls and all(call == (False, True) for call in sdpa_calls)  # eager: already causal
    _simulate_capture(monkeypatch)
    sdpa_calls.clear()
    with torch.no_grad():
        masked = model(input_ids=ids, use_cache=use_cache).logits
    if not any(mask for mask, _ in sdpa_calls):
        pytest.skip("this transformers keeps the causal kernel while tracing: nothing to fix here")
    sdpa_calls.clear()
    with plain_causal_batches(), torch.no_grad():
        fast = model(input_ids=ids, use_cache=use_cache).logits
    assert sdpa_calls and all(call == (False, True) for call in sdpa_calls)
    torch.testing.assert_close(fast, reference)
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=1e-5)


def test_padding_masks_still_apply(monkeypatch, sdpa_calls):
    model = _model()
    ids = torch.randint(0, 300, (2, 16))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0  # left padding in row 0
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=attention_mask).logits
        with plain_causal_batches():
            inside = model(input_ids=ids, attention_mask=attention_mask).logits
        _simulate_capture(monkeypatch)  # a padding mask under capture: still built and applied
        sdpa_calls.clear()
        with plain_causal_batches():
            captured = model(input_ids=ids, attention_mask=attention_mask).logits
    assert sdpa_calls and all(mask for mask, _ in sdpa_calls)
    torch.testing.assert_close(inside, reference)
    torch.testing.assert_close(captured[1], reference[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured[0, 5:], reference[0, 5:], atol=1e-5, rtol=1e-5)


def test_patch_is_scoped_nested_and_restored_on_error():
    original = masking_utils.find_packed_sequence_indices
    tracing = masking_utils.is_tracing
    with plain_causal_batches():
        patched = masking_utils.find_packed_sequence_indices
        assert patched is not original and patched(torch.arange(4)[None]) is None
        assert masking_utils.is_tracing(None) is False
        with plain_causal_batches():  # nested: no second patch, and leaving it keeps the outer one
            assert masking_utils.find_packed_sequence_indices is patched
        assert masking_utils.find_packed_sequence_indices is patched
    assert masking_utils.find_packed_sequence_indices is original and masking_utils.is_tracing is tracing
    with pytest.raises(RuntimeError):
        with plain_causal_batches():
            raise RuntimeError("boom")
    assert masking_utils.find_packed_sequence_indices is original
    with plain_causal_batches(enabled=False):
        assert masking_utils.find_packed_sequence_indices is original
