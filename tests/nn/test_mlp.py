from __future__ import annotations

import torch

from cellsift.nn import MLPDecoder, MLPEncoder


def test_shapes_normalisation_and_defaults():
    enc = MLPEncoder(200)
    dec = MLPDecoder(200)
    assert [m.out_features for m in enc.modules() if isinstance(m, torch.nn.Linear)] == [
        1024,
        1024,
        1024,
        128,
    ]
    drops = [m.p for m in enc.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.4, 0.5, 0.5]  # input dropout, then dropout
    assert [m.p for m in dec.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    enc.eval()
    z = enc(torch.rand(7, 200))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(7))
    assert dec(z).shape == (7, 200)
