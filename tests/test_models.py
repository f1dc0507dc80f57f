"Module tests of kdbook.models: published parameter counts, the ModelOut contract, TeacherBank equivalence."
import copy
import pytest, torch
from torch import nn
import kdbook.data, kdbook.models
from kdbook.models import (MODELS, ModelOut, TeacherBank, bench_teacher_bank, count_params, create_model, global_pool,
                           randomize_bn)

# RepDistiller's definitions, 100 classes (the papers print these rounded: resnet20 0.28M, resnet56 0.86M, ...)
PUBLISHED = {"resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756,
             "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540,
             "resnet32x4": 7_433_860, "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780,
             "wrn_40_2": 2_255_156, "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180,
             "MobileNetV2": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528}

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts(name):
    with torch.device("meta"): assert count_params(create_model(name, 100)) == PUBLISHED[name]

@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2", "mlp_tiny", "cnn_small"])
def test_model_out_contract(name, shape):
    model = create_model(name, 7, shape[0]).eval()
    with torch.no_grad(): out = model(torch.randn(3, *shape))
    assert isinstance(out, ModelOut) and isinstance(model.classifier, nn.Linear)
    assert out.logits.shape == (3, 7)
    torch.testing.assert_close(out.pooled, global_pool(out.feats[-1]))
    torch.testing.assert_close(out.logits, model.head(out.feats[-1]))

@pytest.mark.parametrize("channels_last", [False, True])
def test_teacher_bank_matches_plain_forward(channels_last):
    teachers = [randomize_bn(create_model(n, 10, 1), i) for i, n in enumerate(["resnet8", "wrn_16_1", "cnn_small", "ShuffleV1"])]
    before = [copy.deepcopy(t.state_dict()) for t in teachers]
    x = torch.randn(5, 1, 28, 28)
    out = TeacherBank(teachers, channels_last=channels_last)(x, feats=True)
    assert out.logits.shape == (4, 5, 10) and not out.logits.is_inference()
    for m, t in enumerate(teachers):
        with torch.no_grad(): ref = t.eval()(x)
        torch.testing.assert_close(out.logits[m], ref.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.pooled[m], ref.pooled, rtol=1e-4, atol=1e-4)
        for k, v in t.state_dict().items(): assert torch.equal(v, before[m][k])

def test_teacher_bank_mixed_class_sets_and_errors():
    out = TeacherBank([create_model("resnet8", 10, 1), create_model("mlp", 4, 1)])(torch.randn(2, 1, 8, 8))
    assert isinstance(out.logits, list) and [tuple(l.shape) for l in out.logits] == [(2, 10), (2, 4)]
    with pytest.raises(ValueError, match="at least one teacher"): TeacherBank([])
    with pytest.raises(ValueError, match="must have a `.classifier`"): TeacherBank([nn.Linear(2, 2)])

def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet9'; valid names: resnet8"): create_model("resnet9", 10)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"): create_model("resnet8", 0)
    assert {"mlp_tiny", "mlp_wide", "mlp28"} <= set(MODELS)

def test_bench_teacher_bank_uses_the_one_timer():
    assert kdbook.models.median_times is kdbook.data.median_times and "median_times" not in kdbook.models.__all__
    teachers = [randomize_bn(create_model(n, 10, 1), i) for i, n in enumerate(["resnet8", "cnn_small"])]
    r = bench_teacher_bank(teachers, torch.randn(4, 1, 8, 8), n_iter=2)
    assert r["loop_s"] > 0 and r["bank_s"] > 0 and r["ratio"] == pytest.approx(r["loop_s"] / r["bank_s"])
    assert (r["n_teachers"], r["batch"]) == (2, (4, 1, 8, 8))
    with pytest.raises(ValueError, match="n_iter must be an integer >= 1, got 0"): bench_teacher_bank(teachers, torch.randn(4, 1, 8, 8), n_iter=0)
