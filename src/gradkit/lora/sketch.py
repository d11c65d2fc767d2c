"""Low-rank sketches of a Linear layer's summed gradient, built from activations and output gradients
only: the gradient itself is never formed.

For a Linear layer ``y = x W^T`` (W: out x in) the gradient of one batch is ``G_b = dY_b^T X_b`` (rows of
X and dY are tokens), so ``G_b v = dY_b^T (X_b v)`` and ``G_b^T q = X_b^T (dY_b q)`` cost
``tokens * (in + out)`` per column instead of the ``tokens * in * out`` of forming G_b. Two estimators of
the top singular triplets of ``G = sum_b G_b`` use only such products:

- :class:`StreamingSketch` (one pass, the default): a truncated SVD of the running sum, updated batch by
  batch with one randomized range-finder step warm-started from the current right singular vectors
  (:func:`streaming_update`). It is not linear in G, so it is merged across processes by stacking the
  factorizations (:func:`lowrank_svd`), a mergeable summary in the sense of Frequent Directions.
- :class:`TwoPassSketch`: pass 1 keeps the range and co-range sketches ``Y = G Omega``, ``Z = Psi G``
  (Tropp, Yurtsever, Udell & Cevher, SIAM J. Matrix Anal. Appl. 38(4), 2017); pass 2 multiplies G
  exactly by the bases they give (:func:`bilateral_update`, :func:`bilateral_svd`). Everything it sums
  is linear in G, so an all-reduce gives exactly the single-process result.

Why not Tropp et al.'s single-pass recovery ``Q (Psi Q)^+ Z``: on all-MiniLM-L6-v2's SST-2 gradients
(r = 8, so rank 16) its error is 30-90 % above the optimal ``||G - G_16||_F`` even at sketch size 96.
The gradients have heavy spectral tails, and an oblivious linear sketch needs size ~rank/eps for a
(1 + eps) error (Clarkson & Woodruff, STOC 2009). The streaming sketch is adaptive (each batch is
multiplied by bases found from the earlier ones, as in block power iteration), which a linear sketch
cannot be; on the same gradients it is a few per cent above optimal with state width 1.5 * rank
(the accuracy rows of benchmarks/lora_ga_cost.py measure both sketches against the exact gradient).
"""

from __future__ import annotations

import math

import torch

from gradkit.lora.distributed import all_gather, all_reduce_tensors_, world_size

PROBE = 8  # columns of the Gaussian probe G Theta (only for the ||G||_F^2 in the energy figure)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y)[0]


def probe_matrix(seed: int, in_features: int, device) -> torch.Tensor:
    """The Gaussian probe Theta (in x 8) whose product ``G Theta`` estimates ``||G||_F^2`` (E||G Theta||^2 =
    8 ||G||_F^2), regenerated identically from ``seed`` rather than stored."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randn(in_features, PROBE, generator=generator, device=device)


def lowrank_svd(L: torch.Tensor, R: torch.Tensor, rank: int):
    """Top-``rank`` singular triplets (U, S, Vh) of ``L R^T`` (L: m x c, R: n x c) without forming it:
    ``L = Q_l R_l``, ``R = Q_r R_r``, SVD of the c x c core ``R_l R_r^T``. Exact (in float64)."""
    Ql, Rl = torch.linalg.qr(L.double())
    Qr, Rr = torch.linalg.qr(R.double())
    Uc, S, Vhc = torch.linalg.svd(Rl @ Rr.T)
    U, Vh = Ql @ Uc[:, :rank], Vhc[:rank] @ Qr.T
    return U.to(L.dtype), S[:rank].to(L.dtype), Vh.to(L.dtype)


# ---------------------------------------------------------------------------------- one pass (default)
def streaming_sizes(rank: int, rows: int, cols: int, oversample: int | None = None) -> tuple[int, int]:
    """(state width w, range-finder columns k) for recovering the top ``rank`` triplets of a rows x cols
    matrix: w = rank + o, k = rank + 4o, o = ``oversample`` (default max(8, rank // 2)), capped at
    min(rows, cols). The w - rank spare directions keep candidates that may still climb into the top
    ``rank``; the k - w fresh random columns look for directions the state has not seen. Measured on
    MiniLM's SST-2 gradients (rank 16): w = 24, k = 48 stays within 5 % of the optimal error, w = 16 or
    k = 32 does not."""
    o = max(8, rank // 2) if oversample is None else oversample
    cap = min(rows, cols)
    return min(rank + o, cap), min(rank + 4 * o, cap)


def streaming_update(
    U: torch.Tensor,
    s: torch.Tensor,
    V: torch.Tensor,
    dy: torch.Tensor,
    x: torch.Tensor,
    omega: torch.Tensor,
    width: int,
    power: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of a streaming truncated SVD: the top-``width`` triplets of ``M = U diag(s) V^T + dy^T x``.

    U: out x w, s: w, V: in x w (the running sum's truncated SVD; w = 0 for the first batch),
    dy: tokens x out, x: tokens x in, omega: in x k test matrix whose first w columns are V (the warm
    start). With ``apply(v) = M v`` and ``apply_t(q) = M^T q`` evaluated through the factors:

        Q = orth(M omega)   [then ``power`` subspace-iteration steps Q = orth(M orth(M^T Q))]
        B = Q^T M  (exact),  B = U_b S V_b^T,  new state (Q U_b[:, :w], S[:w], V_b[:, :w])

    Because omega contains V, the state's own span is kept exactly (``Q Q^T U = U``); what is dropped
    is the part of the new batch outside span(Q) and the triplets past w. This is one block power step
    per batch on the growing sum (Halko, Martinsson & Tropp 2011, Alg. 4.3/4.4, streamed). Returns
    (U, s, V) and the batch's own product ``dy^T x omega`` (for callers that fold a probe into omega).
    """
    Us = U * s

    def apply(v: torch.Tensor) -> torch.Tensor:
        return Us @ (V.T @ v) + dy.T @ (x @ v)

    def apply_t(q: torch.Tensor) -> torch.Tensor:
        return V @ (Us.T @ q) + x.T @ (dy @ q)

    batch_part = dy.T @ (x @ omega)  # the batch's product once; the state's part is w-dimensional
    Q = _orth(Us @ (V.T @ omega) + batch_part)
    for _ in range(power):
        Q = _orth(apply(_orth(apply_t(Q))))
    Ub, S, Vbh = torch.linalg.svd(apply_t(Q).T, full_matrices=False)
    w = min(width, S.numel())
    return Q @ Ub[:, :w], S[:w].clone(), Vbh[:w].T.contiguous(), batch_part


class StreamingSketch:
    """One-pass sketch of one layer's summed gradient G (out x in): a truncated SVD of the running sum,
    updated per batch by :func:`streaming_update` (its first batch with one subspace-iteration step, so a
    single batch is recovered as well as many), plus a Gaussian probe ``G Theta`` (in x 8, exact and
    linear; Theta regenerated) for the ||G||_F^2 estimate.

    Held between batches: ``w (in + out + 1) + 8 out`` floats (:attr:`nbytes`); one update also
    allocates about ``(k + 8)(3 in + 3 out + 2 tokens)`` floats of workspace (:attr:`work_nbytes`, the
    largest seen), freed before the next layer's update. Under torch.distributed, :meth:`reduce` gathers every
    rank's factors and takes the exact top-w SVD of their sum (:func:`lowrank_svd`): all ranks get the
    same result, which approximates the sum of all batches as well as one process's stream does.
    """

    passes = 1

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        seed: int,
        device=None,
        oversample: int | None = None,
        first_power: int = 1,
    ):
        self.rank, self.first_power, self.in_features = rank, first_power, in_features
        self.width, self.k = streaming_sizes(rank, out_features, in_features, oversample)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.U = torch.zeros(out_features, self.width, device=self.device)
        self.s = torch.zeros(self.width, device=self.device)
        self.V = torch.zeros(in_features, self.width, device=self.device)
        self.seed = seed
        self.probe = torch.zeros(out_features, PROBE, device=self.device)
        self.updates, self.work_nbytes = 0, 0
        # NaN/Inf: a LAPACK error flags it at once (CPU); otherwise a device-side flag, read at the end,
        # so that a GPU run does not synchronise once per layer and batch
        self.failed = False
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)

    def _test_matrix(self) -> torch.Tensor:
        """[V (the warm start), fresh Gaussian columns, Theta (the probe, also searching)]."""
        if self.updates == 0:
            head = [torch.randn(self.V.shape[0], self.k, generator=self.generator, device=self.device)]
        else:
            fresh = torch.randn(
                self.V.shape[0], self.k - self.width, generator=self.generator, device=self.device
            )
            head = [self.V, fresh]
        return torch.cat([*head, probe_matrix(self.seed, self.in_features, self.device)], dim=1)

    def update(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        """Add ``G_b = dy^T x`` (dy: ... x out, x: ... x in; leading dimensions are tokens)."""
        if self.failed:
            return
        dy = dy.reshape(-1, dy.shape[-1]).float()
        x = x.reshape(-1, x.shape[-1]).float()
        omega = self._test_matrix()
        first = self.updates == 0
        w = 0 if first else self.width  # the state starts empty, not as zeros taking up columns
        try:
            U, s, V, batch_part = streaming_update(
                self.U[:, :w],
                self.s[:w],
                self.V[:, :w],
                dy,
                x,
                omega,
                self.width,
                self.first_power if first else 0,
            )
        except torch.linalg.LinAlgError:  # NaN/Inf in this batch; the caller names the layer
            self.failed = True
            return
        self.probe.add_(batch_part[:, -PROBE:])
        # always the full width: Q has min(out, k + 8) >= w columns, so the step returns w triplets
        self.U, self.s, self.V = U, s, V
        self.updates += 1
        out_f, in_f, cols = self.U.shape[0], self.V.shape[0], omega.shape[1]
        # omega, x omega, M omega, Q, dy Q, M^T Q and the SVD's factors, at their largest
        self.work_nbytes = max(self.work_nbytes, 4 * cols * (3 * in_f + 3 * out_f + 2 * x.shape[0]))
        self.finite &= torch.isfinite(s).all()

    @property
    def nbytes(self) -> int:
        """Bytes held between batches (exact count of the state's tensors)."""
        return _nbytes(self.U, self.s, self.V, self.probe)

    peak_nbytes = nbytes

    def reduce(self) -> None:
        """Combine the ranks' states under torch.distributed (identical result on every rank)."""
        if world_size() == 1:
            return
        # a batch with NaN/Inf on any rank fails the layer on every rank (all raise the same error)
        failed = torch.tensor([float(self.failed or not bool(self.finite))], device=self.device)
        all_reduce_tensors_([self.probe, failed])
        if failed.item() > 0:
            self.failed = True
            return
        left = torch.cat(all_gather(self.U * self.s), dim=1)
        right = torch.cat(all_gather(self.V), dim=1)
        U, s, Vh = lowrank_svd(left, right, self.width)
        self.U, self.s, self.V = U.contiguous(), s, Vh.T.contiguous()
        self.finite &= torch.isfinite(self.s).all()

    def scale_(self, factor: float) -> None:
        self.s.mul_(factor)
        self.probe.mul_(factor)

    def isfinite(self) -> bool:
        return not self.failed and bool(self.finite)

    def is_zero(self) -> bool:
        return not bool(self.s.any())

    def frobenius_sq(self) -> float:
        """Estimate of ||G||_F^2: the state's ``||s||^2`` plus the part of G outside span(U), from the probe:
        ``||(I - U U^T) G Theta||^2 / 8`` (unbiased for ``||(I - U U^T) G||_F^2``)."""
        U = self.U.double()
        outside = self.probe.double() - U @ (U.T @ self.probe.double())
        return float(self.s.double().square().sum() + outside.square().sum() / PROBE)

    def svd(self, rank: int):
        """Top-``rank`` singular triplets (U: out x rank, S, Vh: rank x in) of the sketched G."""
        if rank > self.width:
            raise ValueError(f"rank {rank} exceeds the sketch's state width {self.width}")
        return self.U[:, :rank].contiguous(), self.s[:rank].clone(), self.V[:, :rank].T.contiguous()


# ------------------------------------------------------------------------------------------- two passes
def sketch_sizes(rank: int, rows: int, cols: int, oversample: int | None = None) -> tuple[int, int]:
    """Two-pass sketch sizes (k, l): k = rank + oversample (default max(8, rank // 2)), l = 2k + 1 (Tropp
    et al. 2017, section 5.4), each capped at the matrix size (rows: the side l runs along)."""
    if oversample is None:
        oversample = max(8, rank // 2)
    k = min(rank + oversample, rows, cols)
    return k, min(2 * k + 1, rows)


def gaussian_pair(seed: int, cols: int, k: int, l: int, rows: int, device, dtype=torch.float32):
    """The test matrices (Omega: cols x k, Psi: l x rows), regenerated identically from ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    omega = torch.randn(cols, k, generator=generator, device=device, dtype=dtype)
    psi = torch.randn(l, rows, generator=generator, device=device, dtype=dtype)
    return omega, psi


def sketch_update(
    Y: torch.Tensor, Z: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, omega: torch.Tensor, psi: torch.Tensor
) -> None:
    """Add the sketches of ``M_b = P^T Q`` in place: ``Y += P^T (Q Omega)``, ``Z += (P Psi^T)^T Q``
    (P: tokens x rows, Q: tokens x cols)."""
    Y.addmm_(P.T, Q @ omega)
    Z.addmm_((P @ psi.T).T, Q)


def bilateral_update(
    A: torch.Tensor, B: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, P: torch.Tensor, Q: torch.Tensor
) -> None:
    """Second pass, in place: ``A += G_b P = dy^T (x P)`` and ``B += G_b^T Q = x^T (dy Q)`` for
    ``G_b = dy^T x`` (dy: tokens x out, x: tokens x in, P: in x l, Q: out x k)."""
    A.addmm_(dy.T, x @ P)
    B.addmm_(x.T, dy @ Q)


def bilateral_svd(Q: torch.Tensor, P: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rank: int):
    """Top-``rank`` triplets of ``G_hat = Q Q^T G + (I - Q Q^T) G P P^T`` from ``A = G P``, ``B = G^T Q``.

    ``G - G_hat = (I - Q Q^T) G (I - P P^T)``: the error is projected away on both sides, so bases of
    range-finder quality give a near-optimal approximation (the bilateral two-pass randomized SVD; Halko,
    Martinsson & Tropp 2011, section 5.5). ``G_hat = L R^T``, ``L = [Q, (I - Q Q^T) A]``, ``R = [B, P]``.
    """
    L = torch.cat([Q, A - Q @ (Q.T @ A)], dim=1)
    return lowrank_svd(L, torch.cat([B, P], dim=1), rank)


class TwoPassSketch:
    """Two-pass sketch of one layer's summed gradient G (out x in); linear in G at every stage.

    Pass 1 keeps (Y, Z) of Tropp et al. 2017 for ``M`` = G, or G^T when in > out (so the larger size l
    runs along the smaller dimension). :meth:`next_pass` turns them into orthonormal bases Q (out x k_q)
    and P (in x k_p); pass 2 accumulates ``A = G P``, ``B = G^T Q`` and a probe ``T = G Theta``
    (:func:`bilateral_update`); :meth:`svd` uses :func:`bilateral_svd`. Memory: pass 1
    ``k * max + l * min`` floats, pass 2 ``(k + l)(in + out) + 8 out``; :attr:`peak_nbytes` keeps the
    larger. Test matrices are regenerated from the seed, never stored.
    """

    passes = 2

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        seed: int,
        device=None,
        oversample: int | None = None,
    ):
        self.transposed, self.in_features = in_features > out_features, in_features
        self.rows, self.cols = (in_features, out_features) if self.transposed else (out_features, in_features)
        self.k, self.l = sketch_sizes(rank, self.rows, self.cols, oversample)
        self.rank, self.seed, self.phase = rank, seed, 1
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.Y = torch.zeros(self.rows, self.k, device=self.device)
        self.Z = torch.zeros(self.l, self.cols, device=self.device)
        self.peak_nbytes = self.nbytes
        self.work_nbytes = 0

    def test_matrices(self):
        return gaussian_pair(self.seed, self.cols, self.k, self.l, self.rows, self.device)

    def update(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        dy = dy.reshape(-1, dy.shape[-1]).float()
        x = x.reshape(-1, x.shape[-1]).float()
        tokens = x.shape[0]
        if self.phase == 2:
            bilateral_update(self.A, self.B, dy, x, self.P, self.Q)
            self.T.addmm_(dy.T, x @ probe_matrix(self.seed, self.in_features, self.device))
            work = self.P.shape[0] * PROBE + tokens * (self.P.shape[1] + self.Q.shape[1] + PROBE)
        else:
            P, Q = (x, dy) if self.transposed else (dy, x)
            omega, psi = self.test_matrices()
            sketch_update(self.Y, self.Z, P, Q, omega, psi)
            work = omega.numel() + psi.numel() + tokens * (self.k + self.l)
        self.work_nbytes = max(self.work_nbytes, 4 * work)

    def tensors(self) -> list[torch.Tensor]:
        """The accumulated state of the current pass (what an all-reduce must sum)."""
        return [self.Y, self.Z] if self.phase == 1 else [self.A, self.B, self.T]

    def reduce(self) -> None:
        all_reduce_tensors_(self.tensors())

    @property
    def nbytes(self) -> int:
        held = [self.Y, self.Z] if self.phase == 1 else [self.Q, self.P, self.A, self.B, self.T]
        return _nbytes(*held)

    def scale_(self, factor: float) -> None:
        for t in self.tensors():
            t.mul_(factor)

    def frobenius_sq(self) -> float:
        """Estimate of ||G||_F^2 after pass 2: exact for the approximation, ``||B||^2 + ||(I - QQ^T) A||^2``,
        plus the residual ``(I - QQ^T) G (I - PP^T)`` estimated from the probe, ``||E Theta||^2 / 8``."""
        A, Q = self.A.double(), self.Q.double()
        residual = self.T.double() - A @ (
            self.P.double().T @ probe_matrix(self.seed, self.in_features, self.device).double()
        )
        residual = residual - Q @ (Q.T @ residual)
        return float(
            self.B.double().square().sum()
            + A.square().sum()
            - (Q.T @ A).square().sum()
            + residual.square().sum() / PROBE
        )

    def next_pass(self) -> None:
        """Turn the pass-1 sketches into the bases Q (column side) and P (row side) for pass 2."""
        range_basis = _orth(self.Y.double()).float()
        corange_basis = _orth(self.Z.T.double()).float()
        self.Q, self.P = (corange_basis, range_basis) if self.transposed else (range_basis, corange_basis)
        del self.Y, self.Z
        self.A = torch.zeros(self.Q.shape[0], self.P.shape[1], device=self.device)
        self.B = torch.zeros(self.P.shape[0], self.Q.shape[1], device=self.device)
        self.T = torch.zeros(self.Q.shape[0], PROBE, device=self.device)
        self.phase = 2
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    def isfinite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors())

    def is_zero(self) -> bool:
        return not any(bool(t.any()) for t in self.tensors())

    def svd(self, rank: int):
        """Top-``rank`` singular triplets (U: out x rank, S, Vh: rank x in) of the sketched G (pass 2 done)."""
        if rank > self.k:
            raise ValueError(f"rank {rank} exceeds the sketch size k = {self.k}")
        if self.phase != 2:
            raise RuntimeError("TwoPassSketch.svd needs pass 2: call next_pass() and run the batches again")
        U, S, Vh = bilateral_svd(self.Q, self.P, self.A, self.B, rank)
        return U.contiguous(), S, Vh.contiguous()


def relative_excess_error(G: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    """``||G - U diag(S) Vh||_F / ||G - G_r||_F - 1`` with G_r the best rank-r approximation (r = len(S)):
    how far an approximate truncated SVD is from optimal (0 = optimal)."""
    r = S.numel()
    sv = torch.linalg.svdvals(G.double())
    optimal = math.sqrt(float(sv[r:].square().sum()))
    err = float(torch.linalg.matrix_norm(G.double() - (U.double() * S.double()) @ Vh.double()))
    return err / optimal - 1.0 if optimal > 0 else (0.0 if err == 0 else math.inf)
