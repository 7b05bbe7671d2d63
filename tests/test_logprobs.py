"""token_logprobs against the naive log_softmax + gather."""

import pytest
import torch

from minigrpo.algo import token_logprobs


def naive(logits, ids, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def test_hand_computed_two_token_vocabulary():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; token 1 -> ln(3/4), token 0 -> ln(1/4)
    logits = torch.tensor([[[0.0, torch.log(torch.tensor(3.0)).item()]] * 2], dtype=torch.float64)
    got = token_logprobs(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(got, torch.log(torch.tensor([[0.75, 0.25]], dtype=torch.float64)))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_naive(temperature, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 11, 257, generator=g) * 4).to(dtype)
    ids = torch.randint(0, 257, (3, 11), generator=g)
    # chunk_bytes tiny so rows split into uneven chunks (7 rows of 257 floats, 33 rows total)
    got = token_logprobs(logits, ids, temperature, chunk_bytes=7 * 257 * 4)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), naive(logits, ids, temperature), rtol=0, atol=tol)


def test_gradient_matches_naive():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, 31, generator=g, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ids = torch.randint(0, 31, (2, 5), generator=g)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    (token_logprobs(a, ids, 0.8, chunk_bytes=3 * 31 * 4) * w).sum().backward()
    (naive(b, ids, 0.8) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_bad_arguments():
    with pytest.raises(ValueError, match="B, T, V"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids has shape"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)
