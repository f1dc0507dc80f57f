"""Mutation testing of the formula modules by hand-listed mutants: each drops a term or a setting of a formula
a paper defines. The repository is copied once to a temporary folder; each mutant is applied there alone,
only its module's fast test files run (`pytest -x -q`), and the file is restored. A mutant the tests still
pass is a survivor: either a test is missing or the mutant computes the same numbers (an equivalent mutant).
A habit to run after changing a formula, not a CI step: about 10 minutes on 2 CPU cores.

Usage: python tools/mutate.py [--only SUBSTRING ...] [--list]
"""
import argparse, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMULAS = "tests/test_formulas.py"
# the fast part of the chapters' test files (pytest arguments): no training runs, no `kdbook run`
MEC = ["tests/test_mec.py", FORMULAS, "-k", "not trains and not cli and not memory and not ka_with_labels"]
CFL = ["tests/test_cfl.py", FORMULAS, "-k", "not train and not cli"]
MMKD = ["tests/test_mmkd.py", "-k", "not resumed and not cli and not bad_setups"]
MOEKD = ["tests/test_moekd.py", FORMULAS, "-k",
         "not train and not resumes and not recorded and not cli and not refused"]

MULTISTEP = "tests/test_learner.py::test_multistep_schedule_matches_the_papers_epochs"
GATHER = "tests/test_dist.py::test_gather_leaves_a_sibling_branchs_gradient_alone"
DIST_QP, DIST_TERMS = "tests/test_dist.py::test_aekd_ranks_solve_the_global_qp", \
    "tests/test_dist.py::test_batch_level_terms_match_one_process"

# (module, exact source snippet, replacement, pytest arguments (files, node ids, -k), what the mutant does)
MUTANTS = [
    ('kdbook/core.py',
     'return _reduce(kl.sum(-1) * T * T, reduction)',
     'return _reduce(kl.sum(-1), reduction)',
     ['tests/test_core.py', FORMULAS], 'kd_loss without T²'),
    ('kdbook/core.py',
     'return (softmax_t(student_logits, T) - softmax_t(teacher_logits, T)) / check_temperature(T)',
     'return softmax_t(student_logits, T) - softmax_t(teacher_logits, T)',
     ['tests/test_core.py', FORMULAS], 'kd_logit_grad without 1/T'),
    ('kdbook/core.py',
     'return (1 - alpha) * F.cross_entropy(student_logits, targets) + alpha',
     'return F.cross_entropy(student_logits, targets) + alpha',
     ['tests/test_core.py', FORMULAS], 'ce_kd_loss without 1 − α'),
    ('kdbook/core.py',
     'return (student_logits - teacher_logits).pow(2).sum(-1) / (2 * student_logits.shape[-1])',
     'return (student_logits - teacher_logits).pow(2).sum(-1) / student_logits.shape[-1]',
     ['tests/test_core.py', FORMULAS], 'logit_matching_loss without the 1/2'),
    ('kdbook/baselines.py',
     'loss = self.gamma * ce + self.alpha * kd',
     'loss = ce + self.alpha * kd',
     ['tests/test_baselines.py', FORMULAS], 'multi-teacher loss without γ'),
    ('kdbook/baselines.py',
     'return (1 - F.softmax(ce, dim=0)) / (M - 1)',
     'return F.softmax(-ce, dim=0)',
     ['tests/test_baselines.py', FORMULAS], 'CA-MKD weights as softmax(−CE)'),
    ('kdbook/baselines.py',
     'return (1 - H / H.sum(0, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)) / (M - 1)',
     'return F.softmax(-H, 0)',
     ['tests/test_baselines.py', FORMULAS], 'EBKD weights as softmax(−H)'),
    ('kdbook/baselines.py',
     'return torch.stack([F.mse_loss(r, ft) for r, ft in zip(rs, fts)]).mean()',
     'return torch.stack([F.mse_loss(r, ft) for r, ft in zip(rs, fts)]).sum()',
     ['tests/test_baselines.py', FORMULAS], 'FitNet-MKD hint summed over teachers'),
    ('kdbook/aekd.py',
     'G = logit_gram(kd_logit_grad(upcast(s_logits), upcast(t_logits), T), gram, sync)',
     'G = logit_gram(kd_logit_grad(upcast(s_logits), upcast(t_logits), 1.0), gram, sync)',
     ['tests/test_aekd.py', FORMULAS], 'AE-KD weights at T = 1'),
    ('kdbook/aekd.py',
     'a = capped_simplex_min_norm(u @ u.T, C, check=check) / norm',
     'a = capped_simplex_min_norm(u @ u.T, C, check=check)',
     ['tests/test_aekd.py', FORMULAS], "the code's hint weights without the 1/‖ḡ‖ rescaling"),
    ('kdbook/aekd.py',
     'u = grads.reshape(grads.shape[0], -1).double()',
     'u = grads.mean(1).reshape(grads.shape[0], -1).double()',
     ['tests/test_aekd.py', FORMULAS], "the paper's hint Gram on batch-mean gradients"),
    ('kdbook/aekd.py',
     'return (w * H).sum()',
     'return H.mean()',
     ['tests/test_aekd.py', FORMULAS], 'AE-KD* hints unweighted'),
    ('kdbook/moekd.py',
     'kl = torch.xlogy(q, q) - torch.where(q > 0, q * log_gate, torch.zeros_like(q))',
     'kl = torch.xlogy(q, q)',
     MOEKD, 'ELBO without the gate in its KL'),
    ('kdbook/moekd.py',
     'return (_log_gate(gate_logits) + log_expert_likelihood(expert_logits, y)).softmax(-1)',
     'return log_expert_likelihood(expert_logits, y).softmax(-1)',
     MOEKD, 'posterior without the prior'),
    ('kdbook/moekd.py',
     'num, den = probs.T @ feats, probs.sum(0)',
     'num, den = probs.T @ feats, probs.sum(1)',
     MOEKD, 'prototypes normalised per sample'),
    ('kdbook/moekd.py',
     'return F.softmax(logits / check_temperature(tau), -1)',
     'return F.softmax(logits, -1)',
     MOEKD, 'teacher probabilities without τ'),
    ('kdbook/mec.py',
     'return -T * torch.logsumexp(upcast(logits) / T, -1)',
     'return -torch.logsumexp(upcast(logits), -1)',
     MEC, 'free energy without its temperature'),
    ('kdbook/mec.py',
     'squeeze(1) - self.delta) ** 2',
     'squeeze(1)) ** 2',
     MEC, 'anchor loss without Δ'),
    ('kdbook/cfl.py',
     'if not unbiased: return kxx.mean((-1, -2)) + kyy.mean((-1, -2)) - 2 * kxy.mean((-1, -2))',
     'if not unbiased: return kxx.mean((-1, -2)) + kyy.mean((-1, -2)) - kxy.mean((-1, -2))',
     CFL, 'MMD with one cross term'),
    ('kdbook/cfl.py',
     'off = lambda k, n: (k.sum((-1, -2)) - k.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))',
     'off = lambda k, n: (k.sum((-1, -2)) - k.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * n)',
     CFL, 'unbiased MMD over n² pairs'),
    ('kdbook/cfl.py',
     'return mmds.sum() + sum(F.mse_loss(upcast(r), f) for r, f in zip(recs, fts))',
     'return mmds.sum()',
     CFL, 'CFL without the reconstruction term'),
    ('kdbook/mmkd.py',
     'nesterov=g0["nesterov"], weight_decay=g0["weight_decay"])',
     'nesterov=g0["nesterov"])',
     MMKD, "meta step's look-ahead without weight decay"),
    ('kdbook/mmkd.py',
     'g = g + momentum * b if nesterov else b',
     'g = b',
     MMKD, 'sgd_step without Nesterov'),
    ('kdbook/mmkd.py',
     'return alpha * (w_logit * kl).sum(1).mean() + beta * (w_feat * mse).sum(1).mean()',
     'return alpha * (w_logit * kl).sum(1).mean() + beta * mse.mean()',
     MMKD, 'feature term without its meta weights'),
    ('kdbook/models.py',
     'scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)',
     'scale = bn.weight / torch.sqrt(bn.running_var)',
     ['tests/test_models.py', FORMULAS], 'BN folding without ε'),
    ('kdbook/models.py',
     'fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias,',
     'fused.bias = nn.Parameter(bias * scale + bn.bias,',
     ['tests/test_models.py', FORMULAS], 'BN folding without the mean'),
    ('kdbook/learner.py',
     'return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))',
     'return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))',
     [FORMULAS], 'cosine schedule stepped per epoch only'),
    ('kdbook/learner.py',
     'return cfg.lr * cfg.gamma ** passed',
     'return cfg.lr * cfg.gamma ** min(passed, 1)',
     [MULTISTEP, FORMULAS], 'multistep decays once'),
    ('kdbook/dist.py',
     'g = all_reduce(g.clone(memory_format=torch.contiguous_format), "sum")',
     'g = all_reduce(g.contiguous(), "sum")',
     [GATHER], "the gather's backward in place"),
    ('kdbook/dist.py',
     'if op == "mean": t.div_(d.world_size)',
     'pass',
     [DIST_QP, DIST_TERMS], "all_reduce 'mean' without the division"),
]


def run(copy: Path, tests: list) -> tuple:
    "pytest -x -q on `tests` in the copy, importing the copy's kdbook (and the copy's, in the processes tests"
    " spawn)."
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(copy / "tests")])}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    return p.returncode, time.perf_counter() - t0, (p.stdout.strip().splitlines() or [""])[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[],
                    help="run the mutants whose module or description contains one of these")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.only or any(s in m[0] or s in m[4] for s in a.only)]
    if a.list:
        for i, (f, _, _, tests, what) in enumerate(chosen): print(f"{i:2d} {f}: {what}  [{' '.join(tests)}]")
        return 0
    for f, old, _, _, what in chosen:   # a stale mutant (snippet gone from the source): an error, not a kill
        n = (ROOT / f).read_text().count(old)
        if n != 1:
            raise SystemExit(f"mutant '{what}': its snippet occurs {n} times in {f} (expected once): "
                             "update MUTANTS")
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        skip = shutil.ignore_patterns(".git", "_docs", "_proc", "__pycache__", ".ipynb_checkpoints")
        shutil.copytree(ROOT, copy, ignore=skip)
        for f, old, new, tests, what in chosen:
            path = copy / f
            original = path.read_text()
            path.write_text(original.replace(old, new, 1))
            try: code, secs, last = run(copy, tests)
            finally: path.write_text(original)
            # pytest's 5: no test was collected, so nothing can have failed
            verdict = {0: "survived", 1: "killed", 5: "survived"}.get(code, f"error ({code})")
            print(f"{verdict:9s} {secs:6.1f}s  {f}: {what}  -- {last}", flush=True)
            if code in (0, 5): survivors.append(f"{f}: {what}")
    if survivors:
        print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed; survivors:"
              + "".join(f"\n  {s}" for s in survivors))
    else: print(f"\nall {len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
