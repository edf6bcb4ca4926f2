"""Exact enumeration (spec section 10), float64.

A categorical policy over a few contexts (logits as parameters) with pi_old and pi_ref different
from pi_theta. J(theta) = E_c[E_{pi_theta}[R] - beta*D] is computed exactly by enumeration and
differentiated by autograd; the surrogate's expected gradient under pi_old is the sum over all
outcomes weighted by pi_old. They must agree to 1e-10 for every RPG row (both anchors) and for
grpo_kl_corrected; uncorrected GRPO must not. The divergences below are written from their
definitions, independently of megatron_rpg.losses.kl.
"""

import itertools

import pytest
import torch

from megatron_rpg.losses import LOSSES, LossConfig, token_policy_loss

pytestmark = pytest.mark.usefixtures("float64_by_default")


CONTEXTS, VOCAB, BETA = 3, 6, 0.3
RPG_NAMES = [n for n in LOSSES if n.startswith("rpg_")]


def divergence(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D(pi_theta = p, anchor = q) per context, from the definitions (Defs 3.1, 3.4)."""
    kl_pq = (p * (p.log() - q.log())).sum(-1)
    kl_qp = (q * (q.log() - p.log())).sum(-1)
    mass = (q - p).sum(-1)  # zero for normalized distributions, kept for the definition
    return {"ufkl": kl_qp - mass, "urkl": kl_pq + mass, "fkl": kl_qp, "rkl": kl_pq}[name]


def objective_divergence(loss_name: str) -> str | None:
    if loss_name.startswith("rpg_"):
        return loss_name.rsplit("_", 1)[1]
    if loss_name.startswith("grpo"):
        return "urkl"  # GRPO's k3 term claims to regularize UKL(pi_theta || pi_ref)
    return None


class Bandit:
    """Contexts c ~ p_ctx (fixed), actions a ~ pi(.|c); rewards R[c, a]."""

    def __init__(self, seed: int, spread: float):
        g = torch.Generator().manual_seed(seed)
        self.p_ctx = torch.softmax(torch.randn(CONTEXTS, generator=g), -1)
        self.old_logits = torch.randn(CONTEXTS, VOCAB, generator=g)
        self.ref_logits = torch.randn(CONTEXTS, VOCAB, generator=g)
        self.rollout_logits = torch.randn(CONTEXTS, VOCAB, generator=g)
        self.theta0 = self.old_logits + spread * torch.randn(CONTEXTS, VOCAB, generator=g)
        self.rewards = torch.rand(CONTEXTS, VOCAB, generator=g)
        pi_old = torch.softmax(self.old_logits, -1)
        self.baseline = (pi_old * self.rewards).sum(-1, keepdim=True)  # any constant works

    def true_gradient(self, loss_name: str, anchor: str) -> torch.Tensor:
        theta = self.theta0.clone().requires_grad_()
        p = torch.softmax(theta, -1)
        j = (p * self.rewards).sum(-1)
        div = objective_divergence(loss_name)
        if div is not None:
            anchor_logits = self.ref_logits if anchor == "ref" else self.old_logits
            j = j - BETA * divergence(div, p, torch.softmax(anchor_logits, -1))
        (grad,) = torch.autograd.grad((self.p_ctx * j).sum(), theta)
        return grad

    def expected_surrogate_gradient(
        self, loss_name: str, config: LossConfig, sample_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """sum over (c, a) of P(c) * mu(a|c) * grad L(c, a), mu = pi_old unless given."""
        theta = self.theta0.clone().requires_grad_()
        column = lambda x: x.reshape(-1, 1)  # noqa: E731  one token per (c, a)
        logprobs = column(torch.log_softmax(theta, -1))
        old = column(torch.log_softmax(self.old_logits, -1))
        ref = column(torch.log_softmax(self.ref_logits, -1)) if config.kl_anchor == "ref" else None
        sample_logits = self.old_logits if sample_logits is None else sample_logits
        rollout = column(torch.log_softmax(sample_logits, -1))
        token_loss, _ = token_policy_loss(
            loss_name,
            logprobs,
            old,
            column(self.rewards - self.baseline),
            torch.ones_like(old, dtype=torch.bool),
            ref_logprobs=ref,
            rollout_logprobs=rollout if config.rollout_is != "none" else None,
            config=config,
        )
        weights = self.p_ctx[:, None] * torch.softmax(sample_logits, -1)
        (grad,) = torch.autograd.grad((column(weights) * token_loss).sum(), theta)
        return grad


def config_for(name: str, anchor: str, clip: str, **kw) -> LossConfig:
    return LossConfig(beta=BETA if LOSSES[name].has_kl else 0.0, clip=clip, kl_anchor=anchor, **kw)


EXACT = [*RPG_NAMES, "grpo_kl_corrected", "dapo", "ppo_clip", "reinforce_pp"]


@pytest.mark.parametrize("anchor", ["old", "ref"])
@pytest.mark.parametrize("name", EXACT)
def test_unclipped_surrogate_gradient_is_exact(name, anchor):
    bandit = Bandit(seed=1, spread=0.7)  # pi_theta far from pi_old
    got = bandit.expected_surrogate_gradient(name, config_for(name, anchor, "none"))
    want = -bandit.true_gradient(name, anchor)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("anchor", ["old", "ref"])
@pytest.mark.parametrize("name", EXACT)
def test_clip_inactive_near_pi_old_is_exact(name, anchor):
    bandit = Bandit(seed=2, spread=0.03)
    ratio = torch.exp(
        torch.log_softmax(bandit.theta0, -1) - torch.log_softmax(bandit.old_logits, -1)
    )
    assert ratio.min() > 0.8 and ratio.max() < 1.2  # every clip is inactive
    clip = "dual"
    got = bandit.expected_surrogate_gradient(name, config_for(name, anchor, clip))
    torch.testing.assert_close(got, -bandit.true_gradient(name, anchor), atol=1e-10, rtol=0)


@pytest.mark.parametrize("anchor", ["old", "ref"])
@pytest.mark.parametrize("name", [n for n in RPG_NAMES if "reinforce" in n])
def test_truncated_form_is_exact_when_nothing_is_truncated(name, anchor):
    bandit = Bandit(seed=2, spread=0.03)
    got = bandit.expected_surrogate_gradient(name, config_for(name, anchor, "truncate"))
    torch.testing.assert_close(got, -bandit.true_gradient(name, anchor), atol=1e-10, rtol=0)


@pytest.mark.parametrize("anchor", ["old", "ref"])
def test_uncorrected_grpo_kl_is_measurably_off(anchor):
    bandit = Bandit(seed=1, spread=0.7)
    want = -bandit.true_gradient("grpo", anchor)
    published = bandit.expected_surrogate_gradient("grpo", config_for("grpo", anchor, "none"))
    corrected = bandit.expected_surrogate_gradient(
        "grpo_kl_corrected", config_for("grpo_kl_corrected", anchor, "none")
    )
    torch.testing.assert_close(corrected, want, atol=1e-10, rtol=0)
    assert (published - want).abs().max() > 1e-3


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("name", ["rpg_reinforce_urkl", "rpg_fkl", "grpo_kl_corrected"])
def test_rollout_importance_sampling_corrects_a_different_sampler(name, level):
    """Samples from mu != pi_old; the uncapped rollout IS weight pi_old/mu restores exactness."""
    bandit = Bandit(seed=3, spread=0.5)
    want = -bandit.true_gradient(name, "ref")
    config = config_for(name, "ref", "none", rollout_is=level, rollout_is_cap=float("inf"))
    corrected = bandit.expected_surrogate_gradient(name, config, bandit.rollout_logits)
    torch.testing.assert_close(corrected, want, atol=1e-10, rtol=0)
    plain = bandit.expected_surrogate_gradient(
        name, config_for(name, "ref", "none"), bandit.rollout_logits
    )
    assert (plain - want).abs().max() > 1e-3


@pytest.mark.parametrize("anchor", ["old", "ref"])
@pytest.mark.parametrize("name", ["rpg_fkl", "rpg_ufkl", "rpg_reinforce_urkl", "grpo_kl_corrected"])
def test_the_rollout_weight_belongs_on_the_kl_too(name, anchor):
    """docs/rpg_math.md section 5: every KL estimate is an expectation under pi_old, so for
    samples from mu the weight must multiply it as well: exact with rollout_is_on_kl (ours), off
    by the mismatch with the policy-gradient part alone (verl's placement)."""
    bandit = Bandit(seed=3, spread=0.5)
    want = -bandit.true_gradient(name, anchor)
    base = dict(rollout_is="token", rollout_is_cap=float("inf"))
    ours = bandit.expected_surrogate_gradient(
        name, config_for(name, anchor, "none", **base), bandit.rollout_logits
    )
    torch.testing.assert_close(ours, want, atol=1e-10, rtol=0)
    verls = bandit.expected_surrogate_gradient(
        name,
        config_for(name, anchor, "none", rollout_is_on_kl=False, **base),
        bandit.rollout_logits,
    )
    assert (verls - want).abs().max() > 1e-3


class TwoTokenSequences:
    """Two-token responses y = (a1, a2): pi(y|c) = pi1(a1|c) pi2(a2|c, a1); sequence reward.

    With sequence-level weights (w = pi_theta(y)/pi_old(y), log-probs of whole sequences) the
    surrogates are exact for the sequence-level objective E[R(y)] - beta*D(pi_theta(y|c), pi_ref).
    """

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        shapes = [(2, VOCAB), (2, VOCAB, VOCAB)]
        self.old = [torch.randn(*s, generator=g) for s in shapes]
        self.ref = [torch.randn(*s, generator=g) for s in shapes]
        self.theta0 = [o + 0.6 * torch.randn(*o.shape, generator=g) for o in self.old]
        self.rewards = torch.rand(2, VOCAB, VOCAB, generator=g)
        self.p_ctx = torch.tensor([0.4, 0.6])

    @staticmethod
    def seq_logprobs(logits: list[torch.Tensor]) -> torch.Tensor:
        """[2 contexts, V, V]: log pi1(a1|c) + log pi2(a2|c, a1)."""
        return torch.log_softmax(logits[0], -1)[:, :, None] + torch.log_softmax(logits[1], -1)

    def check(self, name: str, anchor: str) -> None:
        params = [t.clone().requires_grad_() for t in self.theta0]
        lp = self.seq_logprobs(params)
        lp_old, lp_ref = self.seq_logprobs(self.old), self.seq_logprobs(self.ref)
        p, q = lp.exp().reshape(2, -1), (lp_ref if anchor == "ref" else lp_old).exp().reshape(2, -1)
        j = (p * self.rewards.reshape(2, -1)).sum(-1) - BETA * divergence(
            name.rsplit("_", 1)[1], p, q
        )
        want = torch.autograd.grad(-(self.p_ctx * j).sum(), params, retain_graph=True)

        baseline = (lp_old.exp() * self.rewards).sum((-1, -2), keepdim=True)
        token_loss, _ = token_policy_loss(
            name,
            lp.reshape(-1, 1),
            lp_old.reshape(-1, 1),
            (self.rewards - baseline).reshape(-1),
            torch.ones(lp.numel(), 1, dtype=torch.bool),
            ref_logprobs=lp_ref.reshape(-1, 1) if anchor == "ref" else None,
            config=config_for(name, anchor, "none"),
        )
        weights = (self.p_ctx[:, None, None] * lp_old.exp()).reshape(-1, 1)
        got = torch.autograd.grad((weights * token_loss).sum(), params)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("name", "anchor"), list(itertools.product(RPG_NAMES, ["old", "ref"])))
def test_two_token_sequences_with_sequence_level_weights(name, anchor):
    TwoTokenSequences(seed=4).check(name, anchor)


@pytest.mark.parametrize("name", ["ufkl", "urkl", "fkl", "rkl"])
def test_kl_term_value_is_an_unbiased_estimate_of_the_divergence(name):
    """The fully differentiable KL term's *value* averages to D under pi_old (not only its grad)."""
    bandit = Bandit(seed=5, spread=0.7)
    config = LossConfig(beta=1.0, clip="none", kl_anchor="ref")
    column = lambda x: x.reshape(-1, 1)  # noqa: E731
    lp = column(torch.log_softmax(bandit.theta0, -1))
    old = column(torch.log_softmax(bandit.old_logits, -1))
    ref = column(torch.log_softmax(bandit.ref_logits, -1))
    zero_adv = torch.zeros(lp.shape[0])
    token_loss, _ = token_policy_loss(
        f"rpg_{name}", lp, old, zero_adv, torch.ones_like(lp, dtype=torch.bool), ref, config=config
    )
    pi_old = torch.softmax(bandit.old_logits, -1)
    estimate = (pi_old * token_loss.reshape(CONTEXTS, VOCAB)).sum(-1)
    exact = divergence(name, torch.softmax(bandit.theta0, -1), torch.softmax(bandit.ref_logits, -1))
    torch.testing.assert_close(estimate, exact, atol=1e-12, rtol=0)


def algorithm1_as_printed(bandit: Bandit, name: str, clip: bool) -> tuple[torch.Tensor, ...]:
    """The paper's Algorithm 1 line by line, anchor pi_old: A_hat = A - beta*(log w + 1) (rkl) or
    A - beta*log w (urkl) *carrying* gradient through w ("A_hat depends on current theta via w"),
    then -w*A_hat, PPO dual clip (c = 10) if `clip`. Per-outcome losses [C, V] and theta."""
    theta = bandit.theta0.clone().requires_grad_()
    log_w = torch.log_softmax(theta, -1) - torch.log_softmax(bandit.old_logits, -1)
    w = log_w.exp()
    a_hat = bandit.rewards - bandit.baseline - BETA * (log_w + (name == "rpg_rkl"))
    loss = -w * a_hat
    if clip:
        clipped = torch.maximum(loss, -w.clamp(0.8, 1.28) * a_hat)
        loss = torch.where(a_hat >= 0, clipped, torch.minimum(clipped, -10.0 * a_hat))
    return loss, theta, w


@pytest.mark.parametrize("name", ["rpg_rkl", "rpg_urkl"])
def test_algorithm1_as_printed_differs_by_a_zero_mean_term(name):
    """docs/losses.md 'Algorithm 1 as printed': per outcome its gradient exceeds ours by
    beta * grad w (a baseline shift of beta), whose pi_old-mean is beta * grad sum(pi_theta) = 0;
    so without an active clip both are exact in expectation, and with one they differ."""
    bandit = Bandit(seed=1, spread=0.7)
    weights = bandit.p_ctx[:, None] * torch.softmax(bandit.old_logits, -1)
    loss, theta, w = algorithm1_as_printed(bandit, name, clip=False)
    (printed,) = torch.autograd.grad((weights * loss).sum(), theta, retain_graph=True)
    torch.testing.assert_close(printed, -bandit.true_gradient(name, "old"), atol=1e-10, rtol=0)

    ours_loss, _ = token_policy_loss(
        name,
        torch.log_softmax(theta, -1).reshape(-1, 1),
        torch.log_softmax(bandit.old_logits, -1).reshape(-1, 1),
        (bandit.rewards - bandit.baseline).reshape(-1),
        torch.ones(theta.numel(), 1, dtype=torch.bool),
        config=config_for(name, "old", "none"),
    )
    for outcome in (0, 7, 17):  # (context, action) pairs, one at a time
        c, a = divmod(outcome, VOCAB)
        (g_printed,) = torch.autograd.grad(loss[c, a], theta, retain_graph=True)
        (g_ours,) = torch.autograd.grad(ours_loss[outcome, 0], theta, retain_graph=True)
        (g_w,) = torch.autograd.grad(w[c, a], theta, retain_graph=True)
        assert g_w.abs().max() > 1e-2
        torch.testing.assert_close(g_printed - g_ours, BETA * g_w, atol=1e-12, rtol=0)

    clipped, theta, _ = algorithm1_as_printed(bandit, name, clip=True)
    (printed,) = torch.autograd.grad((weights * clipped).sum(), theta)
    ours = bandit.expected_surrogate_gradient(name, config_for(name, "old", "dual"))
    assert (printed - ours).norm() > 0.1 * ours.norm()  # measured 0.34 (rkl), 0.27 (urkl)
