"Chapter 11, MoE-KD: the mixture's functions against brute force, pinned numbers, the method trained and resumed, the CLI."
import json, math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdbook.data import load_dataset
from kdbook.learner import Distiller, TrainConfig, make_method
from kdbook.models import create_model
from kdbook.moekd import (MoEKD, MoEKDEnsemble, SRRL, class_prototypes, elbo, log_expert_likelihood, log_matmul_exp,
                          mixture_log_likelihood, mixture_scores, posterior, shared_expert_log_likelihood,
                          shared_mixture_scores, teacher_probs)
from conftest import quick_run

PINNED = Path(__file__).parent / "fixtures" / "pinned_moekd.json"


def _batch(seed, B=8, K=5, C=6, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, K, generator=g, dtype=torch.float64),
            scale * torch.randn(B, K, C, generator=g, dtype=torch.float64), torch.randint(0, C, (B,), generator=g))


@pytest.mark.parametrize("seed", range(5))
def test_mixture_functions_match_brute_force(seed):
    a, E, y = _batch(seed)
    B, K, C = E.shape
    pa, pE = a.softmax(-1), E.softmax(-1)
    joint = pa * pE[torch.arange(B), :, y]                                   # P(k|x) P(y|k,x), [B, K]
    torch.testing.assert_close(mixture_log_likelihood(a, E, y), joint.sum(-1).log())
    torch.testing.assert_close(posterior(a, E, y), joint / joint.sum(-1, keepdim=True))
    q = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((B,))
    by_hand = (q * pE[torch.arange(B), :, y].log()).sum(-1) - (q * (q / pa).log()).sum(-1)
    torch.testing.assert_close(elbo(a, E, y, q), by_hand)
    assert (elbo(a, E, y, q) <= mixture_log_likelihood(a, E, y) + 1e-12).all()
    torch.testing.assert_close(mixture_scores(a, E), (pa.unsqueeze(-1) * pE).sum(1).log())


@pytest.mark.parametrize("seed", range(3))
def test_the_shared_W_path_equals_the_dense_one(seed):
    g = torch.Generator().manual_seed(seed)
    s, b, a = (3 * torch.randn(*sh, generator=g, dtype=torch.float64) for sh in ((7, 11), (4, 11), (7, 4)))
    y = torch.randint(0, 11, (7,), generator=g)
    E = s.unsqueeze(1) + b.unsqueeze(0)
    torch.testing.assert_close(shared_expert_log_likelihood(s, b, y), log_expert_likelihood(E, y))
    torch.testing.assert_close(shared_mixture_scores(a, s, b), mixture_scores(a, E))


def test_log_matmul_exp_recomputes_the_entries_that_underflow():
    a = torch.tensor([[0.0, -300.0], [1.0, 2.0]])
    b = torch.tensor([[-300.0, 0.5], [0.0, 1.0]])
    ref = torch.logsumexp(a.double().unsqueeze(-1) + b.double().unsqueeze(0), 1)
    out = log_matmul_exp(a, b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_pinned_values():
    "Losses pinned in a fixture (torchdistill's practice): a refactor that changes a number fails here."
    a, E, y = _batch(1234)
    got = {"loglik": mixture_log_likelihood(a, E, y).tolist(), "posterior_row0": posterior(a, E, y)[0].tolist(),
           "elbo_uniform": elbo(a, E, y, torch.full_like(a, 1 / a.shape[1])).tolist(),
           "prototypes": class_prototypes(teacher_probs(a, 4.0), E[:, :, 0]).flatten().tolist()}
    pinned = json.loads(PINNED.read_text())
    assert pinned.keys() == got.keys()
    for k in pinned: torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(pinned[k]), rtol=0, atol=1e-10)


def _distiller(method, out=None, resume=False, epochs=2, teachers=None):
    ds = load_dataset("digits").subset(512, 128, seed=0)
    torch.manual_seed(0)
    teachers = teachers or [create_model("cnn_small", 10, 1)]
    torch.manual_seed(1)
    return Distiller(create_model("cnn_tiny", 10, 1), method, ds, teachers=teachers, out_dir=out, resume=resume,
                     cfg=TrainConfig(epochs=epochs, batch_size=64), progress=False)


@pytest.mark.parametrize("name,settings", [("moekd", {}), ("moekd", {"ablation": "teacher_posterior"}),
                                           ("moekd", {"prototypes": "batch"}), ("moekd_multi", {"teacher_gate": "learned"}),
                                           ("srrl", {}), ("kd", {})])
def test_methods_train_and_predict(name, settings):
    d = _distiller(make_method(name, **settings), epochs=1)
    hist = d.fit()
    assert math.isfinite(hist[-1]["train_loss"]) and 0 <= hist[-1]["test_top1"] <= 100


def test_a_killed_moekd_run_resumes_to_the_same_weights(tmp_path):
    "μ, 𝒢, Ψ and the student come back from the checkpoint; the resumed run ends where the uninterrupted one does."
    ref = _distiller(MoEKD(), epochs=2); ref.fit()
    first = _distiller(MoEKD(), out=tmp_path, epochs=2)
    first.setup(); first._cb("before_fit"); first._train_epoch()          # one epoch, checkpointed, then "killed"
    again = _distiller(MoEKD(), out=tmp_path, resume=True, epochs=2); again.fit()
    for (k, v), (k2, v2) in zip(ref.student.state_dict().items(), again.student.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    for (k, v), (k2, v2) in zip(ref.method.state_dict().items(), again.method.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_ensemble_responsibilities_are_recorded():
    d = _distiller(MoEKDEnsemble(), epochs=1, teachers=[create_model("cnn_small", 10, 1), create_model("mlp", 10, 1)])
    d.fit()
    r = d.method.record()["teacher_responsibility"]
    assert len(r) == 2 and abs(sum(r) - 1) < 1e-4 and min(r) >= 0


@pytest.mark.parametrize("kw,msg", [({"tau": -1}, "temperature T must be a finite number > 0, got -1"),
                                    ({"ablation": "x"}, "ablation must be one of 'none', 'uniform_gate'"),
                                    ({"prototypes": "x"}, "prototypes must be one of 'dataset', 'batch', got 'x'"),
                                    ({"teacher": 1.5}, "teacher must be an int index >= 0"),
                                    ({"factor": 0}, "factor must be an int >= 1, got 0")])
def test_bad_settings_name_the_value(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")): MoEKD(**kw)


def test_a_teacher_over_other_classes_is_refused():
    with pytest.raises(ValueError, match="teacher 0 has 5, the student 10"):
        _distiller(MoEKD(), teachers=[create_model("cnn_small", 5, 1)]).setup()


def test_cli_runs_the_single_teacher_methods(tmp_path, cli_data):
    res = quick_run(tmp_path, cli_data, methods="kd,srrl,moekd,moekd_multi")
    for m in ("kd", "srrl", "moekd", "moekd_multi"):
        run = res["runs"][f"{m}/0"]
        assert run["status"] in ("ok", "diverged") and 0 < run["top1"] <= 100, run   # one epoch: finished
    assert res["runs"]["moekd/0"]["hparams"]["teacher"] == 0
    assert len(res["runs"]["moekd_multi/0"]["record"]["teacher_responsibility"]) == 3


def _conv_bn_relu_by_hand(x, block):
    "One `conv_bn_relu` block from its weights, float64: 'same' convolution, BN (running statistics), ReLU."
    conv, bn = block[0][0], block[0][1]
    y = F.conv2d(x, conv.weight.double(), stride=conv.stride, padding=conv.weight.shape[-1] // 2)
    scale = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps))[:, None, None]
    return torch.relu((y - bn.running_mean.double()[:, None, None]) * scale + bn.bias.double()[:, None, None])


def test_the_gate_and_the_expert_biases_against_a_direct_construction():
    """Eq. 5: the gate is the teacher's classifier g^T on 𝒢(the student's last feature map).
    Eq. 6-8: b_k = W Ψ(μ_k), μ_k = Σ_i P^T(k|x_i) z^T_i / Σ_j P^T(k|x_j) over the training set,
    P^T = softmax(teacher logits / τ). Rebuilt here from the weights in float64 (convolutions, batch-norm,
    softmax and the linear maps written out), not with the method's functions, after a training epoch so that
    𝒢, Ψ and the BN statistics have moved."""
    torch.manual_seed(0)
    teacher = create_model("cnn_small", 10, 1)
    with torch.no_grad(): teacher.classifier.weight.mul_(30)            # a confident teacher: the μ_k differ
    d = _distiller(MoEKD(tau=2.0), epochs=1, teachers=[teacher])
    d.fit()
    m, student = d.method, d.student
    m.eval(); student.eval(); teacher.eval()
    x = next(iter(d.data.loader("test", 64)))[0]
    with torch.no_grad():
        h = student(x).feats[-1].double()
        for block in m.projector.body: h = _conv_bn_relu_by_hand(h, block)
        gate = h.mean((2, 3)) @ teacher.classifier.weight.double().T + teacher.classifier.bias.double()
        torch.testing.assert_close(m.gate_logits(student(x)).double(), gate, rtol=1e-4, atol=1e-4)
        assert torch.equal(m.gate_head.weight, teacher.classifier.weight)  # g^T frozen through training

        t_out = teacher(torch.cat([batch[0] for batch in d.data.loader("train", 512)]))
        z, u = t_out.pooled.double(), t_out.logits.double() / 2.0       # z^T_i and g^T(z^T_i) / τ
        p = torch.exp(u - u.max(1, keepdim=True).values)
        p = p / p.sum(1, keepdim=True)
        mu = (p.T @ z) / p.sum(0)[:, None]
        torch.testing.assert_close(m.mu.double(), mu, rtol=1e-4, atol=1e-5)
        first, last = m.psi[0], m.psi[2]
        e = torch.relu(mu @ first.weight.double().T + first.bias.double())
        e = e @ last.weight.double().T + last.bias.double()            # e_k = Ψ(μ_k)
        b = e @ student.classifier.weight.double().T                    # b_k = W^T e_k, no bias of W
        torch.testing.assert_close(m.expert_biases().double(), b, rtol=1e-4, atol=1e-5)
        assert (b - b.mean(0)).abs().max() > 1e-4                       # experts differ: ≫ the tolerance
