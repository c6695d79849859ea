"""Published scaling laws as small objects: losses L(N, D) and compute-optimal allocations N_opt(C), D_opt(C).

Three kinds, one interface for the planner (`name`, `embedding`, `n_opt(c)`, `d_opt(c)`, `tokens_per_param(c)`,
`loss_opt(c)`, the last None where the law gives no loss):

  - `KaplanLaw`: Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv 2001.08361).
  - `AllocationLaw`: a power law N_opt = n_ref (C / c_ref)^a without a loss: Hoffmann et al. 2022 ("Training
    Compute-Optimal Large Language Models", Chinchilla) Approaches 1 and 2.
  - `ParametricLaw`: L(N, D) = E + A / N^alpha + B / D^beta and its compute-optimal frontier: Chinchilla's
    Approach 3 and Besiroglu et al. 2024's refit of it ("Chinchilla Scaling: A replication attempt",
    arXiv 2404.10102).

Which N a law uses is a flag, `embedding`: Kaplan's N counts non-embedding parameters only (no vocabulary or
position matrices) and its C = 6 N D counts only those; Chinchilla's N counts every parameter (its FLOP count
includes the embedding and the logits, appendix F). Feeding a law the other N is the main source of the gap between
their exponents (Pearce & Song 2024, "Reconciling Kaplan and Chinchilla Scaling Laws", arXiv 2406.12907):
`pearce_song_total_params` and `optimal_non_embedding` reproduce their argument.

Every D_opt here is C / (6 N_opt): the budget C = 6 N D holds exactly, in the law's own N. Losses are in nats per
token on each paper's data and tokenizer (WebText2 with GPT-2's BPE for Kaplan, MassiveText for Chinchilla): they
are not comparable across laws, nor with a loss measured on other data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PF_DAY = 8.64e19  # FLOPs in a petaflop/s-day: 1e15 x 86400, Kaplan et al.'s unit of compute


@dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. 2020, "Scaling Laws for Neural Language Models". N is non-embedding parameters.

    Constants (loss in nats, WebText2, GPT-2 tokenizer):
      - Table 5 (section 1.2): L(N) = (N_c / N)^alpha_N with alpha_N = 0.076, N_c = 8.8e13; L(D) = (D_c / D)^alpha_D
        with alpha_D = 0.095, D_c = 5.4e13 tokens; L(C_min) = (C_c^min / C_min)^alpha_C^min with alpha_C^min = 0.050,
        C_c^min = 3.1e8 PF-days.
      - Table 2 / Eq. 1.5: L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D with alpha_N = 0.076,
        alpha_D = 0.103, N_c = 6.4e13, D_c = 1.8e13.
      - Eq. 1.7 / Table 6: N_opt = 1.3e9 (C_min / PF-day)^0.73, so D grows as C^0.27.

    C_min is the compute at the ideal (small) batch. Training at the critical batch size B_crit, as a compute-
    efficient run does, costs twice the minimum (Kaplan eq. 5.5: C_min = C / (1 + B / B_crit)), so C_min = C / 2
    here (`critical_batch_factor`). That is the convention under which Chinchilla's appendix D.4 quotes Kaplan's
    law as predicting 4.68B parameters at C = 1e21 FLOPs: 1.3e9 x (5e20 / 8.64e19)^0.73 = 4.68e9, where C_min = C
    would give 7.8e9. Table 6's own D_opt = 2e10 (C_min / PF-day)^0.27 tokens agrees with C / (6 N_opt) to about 10%;
    `d_opt` uses the latter so that 6 N D = C exactly.
    """

    name: str = "kaplan"
    embedding: bool = False
    alpha_n: float = 0.076
    n_c: float = 8.8e13
    alpha_d: float = 0.095
    d_c: float = 5.4e13
    alpha_c_min: float = 0.050
    c_c_min_pf_days: float = 3.1e8
    joint_alpha_n: float = 0.076
    joint_alpha_d: float = 0.103
    joint_n_c: float = 6.4e13
    joint_d_c: float = 1.8e13
    a: float = 0.73  # N_opt ∝ C^a
    b: float = 0.27  # D_opt ∝ C^b
    n_e: float = 1.3e9  # N_opt at C_min = 1 PF-day
    critical_batch_factor: float = 2.0  # C / C_min at the critical batch size

    def loss_n(self, n: float) -> float:
        """L(N): converged loss of a model with N non-embedding parameters (data unlimited)."""
        return (self.n_c / n) ** self.alpha_n

    def loss_d(self, d: float) -> float:
        """L(D): loss of a large model trained on D tokens with early stopping."""
        return (self.d_c / d) ** self.alpha_d

    def loss(self, n: float, d: float) -> float:
        """L(N, D), Eq. 1.5 with Table 2's constants."""
        ratio = self.joint_alpha_n / self.joint_alpha_d
        return ((self.joint_n_c / n) ** ratio + self.joint_d_c / d) ** self.joint_alpha_d

    def c_min(self, c: float) -> float:
        """The minimum compute (FLOPs) matching a run of C FLOPs at the critical batch size."""
        return c / self.critical_batch_factor

    def loss_c_min(self, c_min: float) -> float:
        """L(C_min) with C_min in FLOPs (converted to PF-days)."""
        return (self.c_c_min_pf_days / (c_min / PF_DAY)) ** self.alpha_c_min

    def n_opt(self, c: float) -> float:
        """Compute-optimal non-embedding N for a budget of C FLOPs."""
        return self.n_e * (self.c_min(c) / PF_DAY) ** self.a

    def d_opt(self, c: float) -> float:
        return c / (6 * self.n_opt(c))

    def tokens_per_param(self, c: float) -> float:
        return self.d_opt(c) / self.n_opt(c)

    def loss_opt(self, c: float) -> float:
        """The loss on the compute-efficient frontier: L(C_min(C))."""
        return self.loss_c_min(self.c_min(c))


@dataclass(frozen=True)
class AllocationLaw:
    """N_opt(C) = n_ref (C / c_ref)^a and D_opt = C / (6 N_opt) (so D ∝ C^b with b = 1 - a); no loss.

    `n_ref`/`c_ref` anchor the power law at a row the paper tabulates: the papers give these approaches' exponents
    (Chinchilla Table 2), and their coefficients only through their projection tables.
    """

    name: str
    a: float
    b: float
    n_ref: float
    c_ref: float
    embedding: bool = True
    source: str = ""

    def n_opt(self, c: float) -> float:
        return self.n_ref * (c / self.c_ref) ** self.a

    def d_opt(self, c: float) -> float:
        return c / (6 * self.n_opt(c))

    def tokens_per_param(self, c: float) -> float:
        return self.d_opt(c) / self.n_opt(c)

    def loss_opt(self, c: float) -> None:
        return None


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Chinchilla Approach 3's form; N total parameters, D tokens).

    Frontier: minimising L under C = 6 N D (substitute D = C / (6N) and set dL/dN = 0:
    alpha A N^-alpha = beta B (6N / C)^beta) gives
        N_opt(C) = G (C/6)^a,  D_opt(C) = G^-1 (C/6)^b,  G = (alpha A / (beta B))^(1 / (alpha + beta)),
        a = beta / (alpha + beta),  b = alpha / (alpha + beta)
    (Hoffmann et al. 2022, appendix D.2 / eq. 4). E does not move the optimum.
    """

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    embedding: bool = True
    source: str = ""

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def n_opt(self, c: float) -> float:
        return self.G * (c / 6) ** self.a

    def d_opt(self, c: float) -> float:
        return (c / 6) ** self.b / self.G

    def tokens_per_param(self, c: float) -> float:
        return self.d_opt(c) / self.n_opt(c)

    def loss_opt(self, c: float) -> float:
        return self.loss(self.n_opt(c), self.d_opt(c))


KAPLAN = KaplanLaw()

CHINCHILLA_APPROACH1 = AllocationLaw(
    "chinchilla-1", a=0.50, b=0.50, n_ref=1e9, c_ref=1.21e20,
    source="Hoffmann et al. 2022, Approach 1 (fix N, vary tokens): exponents from Table 2, anchored at Table 3's "
    "1B-parameter row (1.21e20 FLOPs, 20.2B tokens); gives 2.87B at 1e21 (appendix D.4 quotes 2.86B) and 69B at "
    "Gopher's 5.76e23 (Table 3: 67B)",
)  # fmt: skip
CHINCHILLA_APPROACH2 = AllocationLaw(
    "chinchilla-2", a=0.49, b=0.51, n_ref=1e9, c_ref=6 * 1e9 * 20.0e9,
    source="Hoffmann et al. 2022, Approach 2 (IsoFLOP profiles): exponents from Table 2, anchored at Table A3's "
    "1B-parameter row (20.0B tokens, so C = 6ND = 1.2e20)",
)  # fmt: skip
CHINCHILLA_APPROACH3 = ParametricLaw(
    "chinchilla-3", E=math.exp(0.5267228), A=math.exp(6.0073404), B=math.exp(6.0179186),
    alpha=0.33917084, beta=0.2849083,
    source="Hoffmann et al. 2022, Approach 3, appendix D.2: E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, "
    "beta = 0.28, here unrounded from the paper's TeX source (as Besiroglu et al. use them), which gives Table 2's "
    "a = 0.46, b = 0.54 (the rounded ones give a = 0.45)",
)  # fmt: skip
BESIROGLU = ParametricLaw(
    "besiroglu", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
    source="Besiroglu et al. 2024, 'Chinchilla Scaling: A replication attempt': Approach 3 refit on the points "
    "re-extracted from Chinchilla's Figure 4 (standard errors E 0.03, A 124.58, B 1293.23, alpha 0.02, beta 0.02); "
    "a = 0.513, about 20 tokens per parameter, consistent with Approaches 1 and 2",
)  # fmt: skip

LAWS: dict[str, KaplanLaw | AllocationLaw | ParametricLaw] = {
    law.name: law for law in (KAPLAN, CHINCHILLA_APPROACH1, CHINCHILLA_APPROACH2, CHINCHILLA_APPROACH3, BESIROGLU)
}

# Chinchilla Table 2: N_opt ∝ C^a, D_opt ∝ C^b, point estimates (bootstrap 10th-90th percentiles in the paper).
CHINCHILLA_EXPONENTS = {1: (0.50, 0.50), 2: (0.49, 0.51), 3: (0.46, 0.54), "kaplan": (0.73, 0.27)}

PEARCE_SONG_GAMMA = 47491.0


def pearce_song_total_params(n_non_embedding: float, gamma: float = PEARCE_SONG_GAMMA) -> float:
    """N_T = N_E + gamma N_E^(1/3) (Pearce & Song 2024): total parameters of a model with N_E non-embedding ones,
    for a family at a fixed aspect ratio. With N_E = 12 L d^2 and d / L = 39.2 (their fit to Chinchilla's model
    configurations), d = (39.2 N_E / 12)^(1/3) = 1.484 N_E^(1/3), and one 32k x d embedding is 47491 N_E^(1/3)."""
    return n_non_embedding + gamma * n_non_embedding ** (1.0 / 3.0)


def optimal_non_embedding(
    law: ParametricLaw, c_non_embedding: float, gamma: float = PEARCE_SONG_GAMMA, tol: float = 1e-10
) -> float:
    """The non-embedding N_E that minimises `law`'s loss at a non-embedding budget C_E = 6 N_E D, the model's real
    size being N_T = pearce_song_total_params(N_E): Kaplan's view of a world that follows `law` in total
    parameters (Pearce & Song 2024). Golden-section search on log N_E (the loss is unimodal there)."""
    log_c = math.log(c_non_embedding / 6)

    def f(log_n: float) -> float:
        n = math.exp(log_n)
        return law.loss(pearce_song_total_params(n, gamma), math.exp(log_c - log_n))

    lo, hi = 0.0, log_c  # 1 <= N_E <= C_E / 6 (at least one token)
    inv_phi = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    f1, f2 = f(x1), f(x2)
    while hi - lo > tol:
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - inv_phi * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + inv_phi * (hi - lo)
            f2 = f(x2)
    return math.exp((lo + hi) / 2)
