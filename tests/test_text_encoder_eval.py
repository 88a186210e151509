"""Fidelity measurement: per-token cosine / relative L2 on real tokens, prompt set, HF encode function."""

import json

import pytest
import torch

from vidaccel.text_encoder.eval import (
    DEFAULT_PROMPTS_PATH,
    compare_embeddings,
    encode_all,
    hf_encode_fn,
    load_default_prompts,
    measure_fidelity,
    per_token_errors,
    token_fidelity,
)


def test_identical_embeddings_are_perfect_and_padding_is_ignored():
    ref = torch.randn(2, 5, 8)
    cand = ref.clone()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cand[0, 3:] = 1e6  # garbage at padding positions must not count
    fid = token_fidelity(ref, cand, mask)
    assert fid.tokens == 8
    assert fid.cosine_mean == pytest.approx(1.0) and fid.cosine_min == pytest.approx(1.0)
    assert fid.rel_l2_mean == 0.0 and fid.rel_l2_max == 0.0


def test_known_cosines_and_relative_errors():
    ref = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]]])
    cand = torch.tensor([[[0.0, 1.0], [0.0, 3.0], [3.0, 4.0], [-1.0, -1.0]]])
    cos, rel = per_token_errors(ref, cand, torch.ones(1, 4, dtype=torch.bool))
    assert cos.tolist() == pytest.approx([0.0, 1.0, 1.0, -1.0])
    assert rel.tolist() == pytest.approx([2**0.5, 0.5, 0.0, 2.0])
    fid = token_fidelity(ref, cand, torch.ones(1, 4, dtype=torch.bool))
    assert fid.cosine_mean == pytest.approx(0.25)
    assert fid.cosine_min == pytest.approx(-1.0)
    assert fid.rel_l2_max == pytest.approx(2.0)
    assert -1.0 <= fid.cosine_p1 <= 0.0


def test_zero_tokens_are_handled_without_nan():
    ref = torch.zeros(1, 2, 3)
    cand = torch.zeros(1, 2, 3)
    cand[0, 1, 0] = 1.0
    cos, rel = per_token_errors(ref, cand, torch.ones(1, 2, dtype=torch.bool))
    assert cos.tolist() == [1.0, 0.0]
    assert rel[0] == 0 and rel[1] == float("inf")


def test_shape_and_mask_mismatches_are_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        per_token_errors(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no real tokens"):
        token_fidelity(torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool))
    a = [(torch.ones(1, 2, 3), torch.tensor([[True, False]]))]
    b = [(torch.ones(1, 2, 3), torch.tensor([[True, True]]))]
    with pytest.raises(ValueError, match="real"):
        compare_embeddings(a, b)


def test_default_prompt_set_is_large_varied_and_has_long_prompts():
    prompts = load_default_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    words = sorted(len(p.split()) for p in prompts)
    assert words[0] >= 10
    assert sum(w > 300 for w in words) >= 3  # near a 512-token encoder limit
    assert json.loads(DEFAULT_PROMPTS_PATH.read_text(encoding="utf-8"))["prompts"] == prompts


class _ToyTokenizer:
    """Whitespace tokenizer: token id = word length; enough to drive hf_encode_fn."""

    model_max_length = 6

    def __call__(self, prompts, padding, truncation, max_length, return_tensors):
        rows = [[len(w) % 50 + 1 for w in p.split()][:max_length] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


class _ToyEncoder(torch.nn.Module):
    def __init__(self, noise=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, 16)
        self.noise = noise

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        h = h + self.noise * torch.sin(h * 7.0)
        return type("Out", (), {"last_hidden_state": h})()


def test_hf_encode_fn_truncates_pads_and_masks():
    encode = hf_encode_fn(_ToyEncoder(), _ToyTokenizer())
    emb, mask = encode(["a bb ccc", "one two three four five six seven eight"])
    assert emb.shape == (2, 6, 16)
    assert mask.dtype == torch.bool and mask.sum(dim=1).tolist() == [3, 6]


def test_measure_fidelity_reports_candidate_and_noise_floor():
    tok = _ToyTokenizer()
    prompts = ["a bb ccc", "dddd e", "ff ggg hhhh iiiii", "j"]
    ref = hf_encode_fn(_ToyEncoder(), tok)
    report = measure_fidelity(ref, hf_encode_fn(_ToyEncoder(noise=0.1), tok), prompts,
                              noise_floor=hf_encode_fn(_ToyEncoder(noise=0.001), tok), batch_size=3)
    assert report.candidate.tokens == 10
    assert report.noise_floor.cosine_mean > report.candidate.cosine_mean
    assert report.candidate.rel_l2_mean > report.noise_floor.rel_l2_mean > 0
    assert set(report.to_dict()) == {"candidate", "noise_floor"}
    same = measure_fidelity(ref, ref, prompts)
    assert same.candidate.cosine_min == pytest.approx(1.0) and same.noise_floor is None


def test_encode_all_batches_and_moves_to_cpu():
    batches = encode_all(hf_encode_fn(_ToyEncoder(), _ToyTokenizer()), ["a", "b c", "d e f"], batch_size=2)
    assert [b[0].shape[0] for b in batches] == [2, 1]
    with pytest.raises(ValueError, match="batch_size"):
        encode_all(lambda p: None, ["a"], batch_size=0)
