from __future__ import annotations

import pytest
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


def test_an_encoder_without_hidden_layers_reads_sparse_counts():
    """hidden=(): one Linear to the latent space, which the sparse path reads as well."""
    enc = MLPEncoder(50, hidden=(), latent=4).eval()
    x = torch.rand(6, 50) * (torch.rand(6, 50) < 0.2)
    torch.testing.assert_close(enc(x.to_sparse_csr()), enc(x), rtol=1e-5, atol=1e-6)


def _counts_csr(n=60, genes=3000, density=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, genes, generator=g) < density
    mask[3] = False  # a cell with no counts
    x = torch.where(mask, torch.rand(n, genes, generator=g) * 3, torch.zeros(()))
    return x, x.to_sparse_csr()


def test_sparse_input_in_cpu_inference_matches_dense():
    """The first layer over stored values only (CPU inference) against the dense layer."""
    torch.manual_seed(0)
    enc = MLPEncoder(3000, (256, 64), 16)
    x, csr = _counts_csr()
    enc.train()
    for _ in range(3):  # non-trivial BatchNorm statistics
        enc(x)
    enc.eval()
    with torch.no_grad():
        assert enc.reads_sparse(csr)
        want = enc(x)
        got = enc(csr)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # unsorted column indices within rows: same answer
        crow, col, val = csr.crow_indices(), csr.col_indices().clone(), csr.values().clone()
        for i in range(len(crow) - 1):
            a, b = int(crow[i]), int(crow[i + 1])
            col[a:b], val[a:b] = col[a:b].flip(0), val[a:b].flip(0)
        shuffled = torch.sparse_csr_tensor(crow, col, val, size=csr.shape)
        torch.testing.assert_close(enc(shuffled), want, atol=1e-5, rtol=1e-5)
        # a changed weight is read again, not the transposed copy of the old one
        enc.network[0][1].weight.mul_(2)
        torch.testing.assert_close(enc(csr), enc(x), atol=1e-5, rtol=1e-5)
    # also after a fused optimiser step, which updates weights without bumping their version
    opt = torch.optim.AdamW(enc.parameters(), lr=0.1, fused=True)
    (enc(csr) ** 2).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(enc(csr), enc(x), atol=1e-5, rtol=1e-5)
    assert not enc.reads_sparse(csr.clone().requires_grad_(True))  # asked for its gradient


def test_the_weight_is_transposed_once_while_weights_are_unchanged():
    """Within weights_unchanged (inference over many batches) the first layer's weight is
    transposed once, not once a batch (hunt197: ~100 ms a batch of SCimilarity's model);
    the same outputs; outside it, a changed weight is read again."""
    torch.manual_seed(0)
    enc = MLPEncoder(3000, (256, 64), 16).eval()
    x, csr = _counts_csr()
    weight = enc.network[0][1].weight
    with torch.no_grad():
        want = enc(csr)
        with enc.weights_unchanged():
            first = enc._weight_gh(weight)
            torch.testing.assert_close(enc(csr), want, rtol=0, atol=0)
            weight.mul_(2)  # (no one does within: the copy held is not made again)
            assert enc._weight_gh(weight) is first
            torch.testing.assert_close(enc(csr), want, rtol=0, atol=0)
            with enc.weights_unchanged():  # (nested: its own copy, then the outer's again)
                torch.testing.assert_close(enc(csr), enc(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc(csr), enc(x), atol=1e-5, rtol=1e-5)


def test_a_hold_is_its_own_threads():
    """Two threads' holds ending out of order (A, B begin; A, B end) leave no hold after
    them, and neither reads the other's (review189: the module kept B's restored hold of A
    for good, and every later forward read that old weight)."""
    import threading

    torch.manual_seed(0)
    enc = MLPEncoder(3000, (256, 64), 16).eval()
    x, csr = _counts_csr()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    got = {}

    def a() -> None:
        with torch.no_grad(), enc.weights_unchanged():
            got["a"] = enc(csr)
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b() -> None:
        a_in.wait(10)
        with torch.no_grad(), enc.weights_unchanged():
            b_in.set()
            a_out.wait(10)
            got["b"] = enc(csr)

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    torch.testing.assert_close(got["a"], got["b"], rtol=0, atol=0)
    with torch.no_grad():
        enc.network[0][1].weight.mul_(2)  # (outside every hold: read again)
        torch.testing.assert_close(enc(csr), enc(x), atol=1e-5, rtol=1e-5)
    # a task begun within a hold (its context a copy) reads the weight again once the hold
    # has ended (review190: it kept reading the copy held)
    import asyncio

    async def main() -> None:
        later = asyncio.Event()

        async def task() -> torch.Tensor:
            await later.wait()
            return enc(csr)

        with torch.no_grad(), enc.weights_unchanged():
            enc(csr)
            running = asyncio.create_task(task())
        with torch.no_grad():
            enc.network[0][1].weight.mul_(2)
            later.set()
            torch.testing.assert_close(await running, enc(x), atol=1e-5, rtol=1e-5)

    asyncio.run(main())


def test_a_compiled_encoder_reads_sparse_counts_and_matches_the_uncompiled_one():
    """compile() leaves the first layer out of its graphs: a sparse batch is read by its
    stored values (not densified: the first layer of every gene), and the compiled encoder
    gives the uncompiled one's outputs and gradients, sparse or dense."""
    torch.manual_seed(0)
    enc = MLPEncoder(3000, (64, 32), 16).eval()  # eval: no dropout draws to tell apart
    x, csr = _counts_csr(seed=3)
    r = torch.randn(len(x), 16)

    def run(inp):
        enc.zero_grad()
        out = enc(inp)
        (out * r).sum().backward()
        return out.detach(), [p.grad.clone() for p in enc.parameters()]

    want = run(x)
    enc.compile()
    assert enc.reads_sparse(csr)
    compiled = [m for m in enc.modules() if getattr(m, "_compiled_call_impl", None)]
    assert len(compiled) == 2 + len(enc.network) - 1  # (BatchNorm, PReLU; each later block)
    for inp in (csr, x):
        out, grads = run(inp)
        torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-5)
        for got, ref in zip(grads, want[1], strict=True):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_sparse_input_gradients_match_dense():
    torch.manual_seed(1)
    enc = MLPEncoder(3000, (128, 64), 16).eval()  # eval: no dropout, fixed BatchNorm
    x, csr = _counts_csr(seed=2)
    r = torch.randn(len(x), 16)
    grads = []
    for inp in (x, csr):
        enc.zero_grad()
        (enc(inp) * r).sum().backward()
        first = enc.network[0][1]
        grads.append((first.weight.grad.clone(), first.bias.grad.clone()))
    for dense, sparse in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-4)
    assert grads[0][0].abs().sum() > 0


def test_sparse_input_dropout_drops_stored_values():
    """Training mode: input dropout over the stored values. With p = 1 every value is
    dropped, as from the dense matrix."""
    torch.manual_seed(3)
    enc = MLPEncoder(3000, (32,), 8, input_dropout=1.0).train()
    x, csr = _counts_csr(seed=4)
    torch.testing.assert_close(enc(csr), enc(torch.zeros_like(x)))
    enc2 = MLPEncoder(3000, (32,), 8, input_dropout=0.5).train()
    with torch.no_grad():  # the dropped values differ from call to call
        assert not torch.equal(enc2(csr), enc2(csr))


@pytest.mark.parametrize("column", [50, -1])
def test_sparse_input_with_a_column_outside_the_genes_is_refused(column):
    """A column index past the genes, or negative (which the kernel skipped, as if the cell
    had no counts), is refused."""
    enc = MLPEncoder(50, (8,), 4).eval()
    bad = torch.sparse_csr_tensor(
        torch.tensor([0, 1]), torch.tensor([column]), torch.tensor([1.0]), size=(1, 50)
    )
    with (
        torch.no_grad(),
        pytest.raises(
            ValueError,
            match=rf"malformed CSR batch: a column index is {column}, outside the 50 batch",
        ),
    ):
        enc(bad)


def test_sparse_input_whose_row_pointer_falls_is_refused():
    """A row pointer that falls (a tensor built without torch's checks) read as empty rows:
    the cells' counts silently left out (hunt205); refused by name."""
    enc = MLPEncoder(10, (8,), 4).eval()
    bad = torch.sparse_csr_tensor(
        torch.tensor([0, 3, 1, 3]),
        torch.tensor([1, 2, 3]),
        torch.tensor([1.0, 1.0, 1.0]),
        size=(3, 10),
        check_invariants=False,
    )
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"row pointer decreases at row 1 \(3, then 1\)"),
    ):
        enc(bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_an_encoder_of_another_dtype_reads_float32_counts_sparse_or_dense(dtype):
    """A float64 or bfloat16 encoder given float32 counts (sparse or dense), or a float32
    one given float64 or int counts: the batch in the weights' dtype, as the dense layer
    with the batch cast by hand (the sparse kernel, float32 only, crashed on them)."""
    torch.manual_seed(5)
    x, csr = _counts_csr(seed=6)
    enc = MLPEncoder(3000, (64,), 8).eval().to(dtype)
    with torch.no_grad():
        want = enc(x.to(dtype))
        assert not enc.reads_sparse(csr)
        torch.testing.assert_close(enc(csr), want)
        torch.testing.assert_close(enc(x), want)
    enc32 = MLPEncoder(3000, (64,), 8).eval()
    with torch.no_grad():
        want = enc32(x)
        torch.testing.assert_close(enc32(x.double()), want)
        torch.testing.assert_close(enc32(x.round().long()), enc32(x.round()))


def test_whole_number_and_float64_counts_under_autocast_and_in_training():
    """Under autocast, float64 or int counts are taken as float32 (autocast casts only the
    floats it knows); int CSR counts train (input dropout takes floats)."""
    torch.manual_seed(8)
    x, _ = _counts_csr(seed=9)
    counts = x.round().long()
    enc = MLPEncoder(3000, (32,), 8).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = enc(counts.float())
        torch.testing.assert_close(enc(counts), want)
        torch.testing.assert_close(enc(counts.double()), want)
    enc.train()
    enc(counts.to_sparse_csr()).sum().backward()
    assert enc.network[0][1].weight.grad.abs().sum() > 0
    # a float64 encoder, whose weights autocast leaves as they are: counts as float64
    enc64 = MLPEncoder(3000, (32,), 8).eval().double()
    with torch.no_grad():
        want = enc64(counts.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for given in (counts, counts.double(), counts.float(), counts.to_sparse_csr()):
                torch.testing.assert_close(enc64(given), want)


def test_counts_changed_in_place_before_backward_are_an_error():
    """Stored values changed in place between forward and backward: autograd's error, as for
    a dense input, not the weight gradient of other counts."""
    enc = MLPEncoder(3000, (32,), 8).eval()
    _, csr = _counts_csr(seed=7)
    out = enc(csr)
    csr.values().mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("n_genes", [40, 60])
@pytest.mark.parametrize("sparse", [True, False])
def test_a_batch_of_another_gene_count_is_refused(n_genes, sparse):
    """A CSR batch read by the sparse first layer must have the encoder's genes: fewer gave
    an embedding without a word, more read past the weight; a dense one is told the same
    (hunt252: torch's "mat1 and mat2 shapes cannot be multiplied")."""
    enc = MLPEncoder(50, (8,), 4).eval()
    x = torch.eye(3, n_genes)
    with (
        torch.no_grad(),
        pytest.raises(
            ValueError, match=rf"shape \(3, {n_genes}\), and the encoder reads cells x 50"
        ),
    ):
        enc(x.to_sparse_csr() if sparse else x)


def test_a_compiled_encoder_and_pipeline_read_a_sparse_batch_as_uncompiled():
    """torch.compile of the encoder (or the transforms) with a CSR batch on the CPU: the
    first layer's and the transforms' numpy kernels run outside the graphs (hunt252: the
    traced kernel failed on torch's fake tensors)."""
    from cellsift.transforms import default_pipeline

    torch.manual_seed(0)
    _, csr = _counts_csr(seed=3)
    enc = MLPEncoder(csr.shape[1], (16,), 4).eval()
    pipe = default_pipeline()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(enc, backend="eager")(csr), enc(csr))
        got = torch.compile(pipe, backend="eager")({"x_ng": csr})["x_ng"]
        torch.testing.assert_close(got, pipe({"x_ng": csr})["x_ng"])


def test_a_model_off_the_cpu_meets_a_cpu_csr_batch_with_torchs_device_error():
    """A model elsewhere (the meta device here, as a GPU's) given CSR counts on the CPU:
    torch's error naming both devices, as for a dense batch, not numpy's conversion error
    from the CPU kernel."""
    enc = MLPEncoder(20, hidden=(8,), latent=4).to("meta").eval()
    x = torch.eye(3, 20)
    assert not enc.reads_sparse(x.to_sparse_csr())
    for batch in (x, x.to_sparse_csr()):
        with pytest.raises(RuntimeError, match=r"device meta.*device cpu"):
            enc(batch)
