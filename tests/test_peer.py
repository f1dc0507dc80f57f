"kdbook against a peer framework (chapter 30): the three contenders compute the same loss, the benchmark runs end to end, and a missing torchdistill is named with its install command."
import sys
import pytest
import torch

from kdbook import cli
from kdbook.bench import (PEER_CONTENDERS, PeerSetting, format_peer, peer_benchmark, peer_data, peer_losses,
                          peer_step_functions, require_torchdistill, torchdistill_contender)
from kdbook.data import DeviceLoader

SMALL = PeerSetting(batch_size=32)

def _batch(ds, n=32):
    return next(iter(DeviceLoader(ds.train, n, train=True, mean=ds.mean, std=ds.std, pad=ds.pad, flip=ds.flip, seed=3)))[:2]

def test_the_three_contenders_compute_the_same_loss_on_one_batch():
    pytest.importorskip("torchdistill")
    ds = peer_data(256)
    cs = peer_step_functions(ds, SMALL, variants={"kdbook+cl": {"channels_last": True}})
    assert set(PEER_CONTENDERS) <= set(cs)
    x, y = _batch(ds)
    losses = peer_losses(cs, x, y)
    for name, loss in losses.items():   # float32 rounding only: BN folding and channels_last change the last bits
        assert loss == pytest.approx(losses["plain"], rel=1e-5, abs=1e-5), (name, losses)
    # a teacher's logits under bf16 autocast (a switch of ours) are not the fp32 ones: the check would see it
    bf = peer_step_functions(ds, SMALL, contenders=("kdbook", "plain"), teacher_bf16=True)
    bf_losses = peer_losses(bf, x, y)
    assert bf_losses["kdbook"] != bf_losses["plain"] and bf_losses["kdbook"] == pytest.approx(bf_losses["plain"], rel=1e-2)

def test_students_must_start_from_the_same_weights():
    pytest.importorskip("torchdistill")
    ds = peer_data(256)
    a = peer_step_functions(ds, SMALL, contenders=("plain",))
    b = peer_step_functions(ds, PeerSetting(batch_size=32, seed=1), contenders=("kdbook",))
    with pytest.raises(ValueError, match="student differs"): peer_losses({**a, **b}, *_batch(ds))
    with pytest.raises(ValueError, match="unknown contenders"): peer_step_functions(ds, SMALL, contenders=("keras",))

def test_a_tiny_peer_benchmark_runs_end_to_end():
    pytest.importorskip("torchdistill")
    r = peer_benchmark(rounds=2, steps=1, n_train=256, setting=SMALL, warmup=1)
    assert set(r["images_per_s"]) == set(PEER_CONTENDERS) and all(v > 0 for v in r["images_per_s"].values())
    assert set(r["ratios"]) == {"kdbook/torchdistill", "kdbook/plain"} and all(v > 0 for v in r["ratios"].values())
    assert all(p["data"] > 0 and p["teacher"] > 0 for p in r["parts_ms"].values())
    text = format_peer(r)
    print(text)   # ratios are printed, never asserted: this machine is shared
    assert "x torchdistill, " in text and "x plain)" in text and text.count("images/s") == 3
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"): peer_benchmark(rounds=0)

def test_a_missing_torchdistill_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchdistill", None)   # `import torchdistill` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "kdbook\[peer\]"'): require_torchdistill()
    ds = peer_data(256)
    with pytest.raises(ImportError, match=r'pip install "kdbook\[peer\]"'):
        torchdistill_contender(ds, torch.nn.Identity(), torch.nn.Identity(), SMALL)
    assert cli.main(["bench", "--peer"]) == 2
    assert 'pip install "kdbook[peer]"' in capsys.readouterr().err
