"Public checkpoints (RepDistiller, mdistiller) converted into the zoo by name, checked against RepDistiller."
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from kdbook.models import (MODELS, PUBLIC_ARCHS, TeacherBank, create_model, from_public_checkpoint,
                           infer_public_arch, load_public_state_dict, public_key_map)

FIXTURES = Path(__file__).parent / "fixtures" / "public"
FAMILIES = ("resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2")   # smallest per family
LAYOUTS = json.loads((FIXTURES / "layouts.json").read_text())["layouts"]


def read_fixture(arch: str):
    "RepDistiller's state dict (float32), input, logits and feature maps (first image) stored for `arch`."
    with safe_open(FIXTURES / f"{arch}.safetensors", "pt") as f:
        meta, stored = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    sd = {k.removeprefix("t."): v for k, v in stored.items() if k.startswith("t.")}
    for k in (k for k in stored if k.startswith("w4.")):   # two 4-bit codes per byte, code = integer + 8
        info, codes = json.loads(meta[k]), stored[k]
        ints = torch.stack([codes >> 4, codes & 15], 1).flatten()[:math.prod(info["shape"])].float() - 8
        sd[k.removeprefix("w4.")] = ints.reshape(info["shape"]) * 2.0 ** -info["exp"]
    return sd, stored["x"], stored["logits"], [stored[f"feat.{i}"] for i in range(int(meta["feats"]))]


def rel_err(a, ref) -> float:
    "Largest absolute difference relative to the largest reference magnitude."
    return float((a - ref).abs().max() / ref.abs().max())


def refusal(call) -> str:
    "The message of the ValueError `call()` raises, checked to be one line."
    with pytest.raises(ValueError) as info: call()
    message = str(info.value)
    assert "\n" not in message
    return message


def repdistiller_checkpoint(sd: dict, path: Path) -> Path:
    "`sd` saved as RepDistiller's train_teacher.py saves a teacher."
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                 "param_groups": [{"lr": 5e-5, "params": [0]}]}
    torch.save({"epoch": 240, "model": sd, "best_acc": torch.tensor(71.5), "optimizer": optimizer}, path)
    return path


@pytest.mark.parametrize("arch", FAMILIES)
def test_fixture_reproduces_repdistillers_logits_and_feats(arch, tmp_path):
    sd, x, logits, feats = read_fixture(arch)
    path = repdistiller_checkpoint(sd, tmp_path / "ckpt_epoch_240.pth")
    model = from_public_checkpoint(path, repdistiller_feats=True)
    assert type(model) is type(create_model(arch, 10)) and not model.training
    with torch.no_grad(): out = model(x)
    assert out.logits.dtype == torch.float32 and rel_err(out.logits, logits) < 1e-5
    assert len(out.feats) >= len(feats)
    for i, f in enumerate(feats):
        assert out.feats[i][:1].shape == f.shape and rel_err(out.feats[i][:1], f) < 1e-5, (arch, i)


@pytest.mark.parametrize("arch", FAMILIES)
def test_arch_inferred_from_keys_and_shapes(arch):
    sd = read_fixture(arch)[0]
    assert infer_public_arch(sd) == arch
    assert infer_public_arch(sd, num_classes=10) == arch


def test_wrn_feats_option_and_default():
    "Default: feats[3] is relu(bn1(f3)), from F.batch_norm and the file's bn1; the option gives f3."
    sd, x, logits, feats = read_fixture("wrn_16_1")
    plain, split = from_public_checkpoint(sd), from_public_checkpoint(sd, repdistiller_feats=True)
    with torch.no_grad(): a, b = plain(x), split(x)
    bn1 = [sd[f"bn1.{t}"] for t in ("running_mean", "running_var", "weight", "bias")]
    head = F.relu(F.batch_norm(feats[3], *bn1))
    assert len(a.feats) == 4 and len(b.feats) == 5
    assert rel_err(a.feats[3][:1], head) < 1e-5 and rel_err(b.feats[4][:1], head) < 1e-5
    assert rel_err(b.feats[3][:1], feats[3]) < 1e-5 and rel_err(a.feats[3][:1], feats[3]) > 0.1
    assert rel_err(a.logits, logits) < 1e-5 and rel_err(b.logits, logits) < 1e-5


@pytest.mark.parametrize("arch", PUBLIC_ARCHS)
def test_map_matches_repdistillers_layout_and_order(arch):
    "RepDistiller's keys and shapes (from its code); by name is by order; one-to-one onto the zoo's keys."
    with torch.device("meta"): model = create_model(arch, 100)
    key_map, ours = public_key_map(model), model.state_dict()
    assert [[k, list(ours[v].shape)] for k, v in key_map.items()] == LAYOUTS[arch]
    assert list(key_map.values()) == list(ours)


@pytest.mark.parametrize("arch", PUBLIC_ARCHS)
def test_random_state_dict_in_repdistiller_layout_loads_by_name(arch):
    "A state dict in RepDistiller's layout with distinct values: each tensor lands where its name says."
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g))
          for k, shape in LAYOUTS[arch]}
    model = from_public_checkpoint(sd)
    assert type(model) is type(create_model(arch, 100))
    ours = model.state_dict()
    for (k, _), ours_k in zip(LAYOUTS[arch], ours, strict=True):   # RepDistiller's order is the zoo's order
        assert torch.equal(ours[ours_k], sd[k]), (arch, k, ours_k)


def test_layouts_are_all_distinct():
    "No two architectures share keys and shapes, so inference is unambiguous."
    assert len({json.dumps(v) for v in LAYOUTS.values()}) == len(PUBLIC_ARCHS) == 19


def test_wrong_files_get_one_line_naming_the_mismatch():
    sd = read_fixture("resnet8")[0]
    missing = {k: v for k, v in sd.items() if k != "layer2.0.bn1.running_var"}
    assert refusal(lambda: from_public_checkpoint(missing, "resnet8")) == (
        "the state dict is not a repdistiller resnet8 checkpoint: missing key 'layer2.0.bn1.running_var'")
    shape = {**sd, "layer1.0.conv2.weight": sd["layer1.0.conv2.weight"][:, :8]}
    assert refusal(lambda: from_public_checkpoint(shape, "resnet8")).endswith(
        "'layer1.0.conv2.weight' has shape (16, 8, 3, 3), resnet8 has (16, 16, 3, 3)")
    assert refusal(lambda: from_public_checkpoint(sd, "resnet14")).endswith(
        "missing key 'layer1.1.conv1.weight'")
    assert refusal(lambda: from_public_checkpoint(sd, "resnet8x4")).endswith(
        "'conv1.weight' has shape (16, 3, 3, 3), resnet8x4 has (32, 3, 3, 3)")
    assert refusal(lambda: from_public_checkpoint(read_fixture("wrn_16_1")[0], "resnet8")).endswith(
        "'bn1.weight' has shape (64,), resnet8 has (16,)")
    assert refusal(lambda: from_public_checkpoint(sd, "resnet8", num_classes=100)).endswith(
        "'fc.weight' has shape (10, 64), resnet8 has (100, 64)")
    assert refusal(lambda: from_public_checkpoint({**sd, "extra.weight": torch.zeros(1)})).endswith(
        "nearest resnet8: unexpected key 'extra.weight'")
    assert refusal(lambda: from_public_checkpoint({**sd, "fc.bias": torch.zeros(100)})).endswith(
        "nearest resnet8: 'fc.bias' has shape (100,), resnet8 has (10,)")
    assert refusal(lambda: from_public_checkpoint({**sd, "fc.bias": [0.0] * 10}, "resnet8")).endswith(
        "'fc.bias' is a list, not a tensor")
    ints = {**sd, "fc.bias": torch.zeros(10, dtype=torch.int64)}
    assert refusal(lambda: from_public_checkpoint(ints, "resnet8")).endswith(
        "'fc.bias' has dtype torch.int64, resnet8 needs a floating-point tensor")
    assert refusal(lambda: from_public_checkpoint({"a": torch.zeros(1)})).startswith(
        "the state dict is not a repdistiller checkpoint: "
        "it matches none of the 19 public architectures; nearest ")


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    "weights_only: a checkpoint that names os.system is refused, and nothing it names is called."
    sd = read_fixture("resnet8")[0]
    path = tmp_path / "evil.pth"
    torch.save({"model": sd, "hook": os.system}, path)
    message = refusal(lambda: from_public_checkpoint(path))
    assert "refused, it holds posix.system" in message or "refused, it holds nt.system" in message
    assert "weights_only=True" in message
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert refusal(lambda: from_public_checkpoint(garbage)).startswith(f"{garbage}: not a")


def test_file_formats_safetensors_bare_dict_dataparallel_and_old_bn(tmp_path):
    sd, x, logits, _ = read_fixture("ShuffleV2")
    save_file(sd, tmp_path / "t.safetensors")
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "dp.pth")
    old_bn = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}   # PyTorch < 0.4.1 files
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    for src in (tmp_path / "t.safetensors", str(tmp_path / "bare.pth"), tmp_path / "dp.pth", old_bn):
        with torch.no_grad(): out = from_public_checkpoint(src, "ShuffleV2")(x)
        assert rel_err(out.logits, logits) < 1e-5
    model = from_public_checkpoint(half, source="mdistiller")
    assert next(model.parameters()).dtype == torch.float32
    assert set(load_public_state_dict(tmp_path / "dp.pth")) == set(sd)


def test_bad_arguments():
    sd = read_fixture("resnet8")[0]
    with pytest.raises(ValueError, match="source must be one of 'repdistiller', 'mdistiller', got 'other'"):
        from_public_checkpoint(sd, source="other")
    with pytest.raises(ValueError, match="arch must be one of 'resnet8', .* got 'mlp'"):
        from_public_checkpoint(sd, arch="mlp")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        from_public_checkpoint(sd, num_classes=0)
    with pytest.raises(TypeError, match="path_or_state_dict must be a path or a mapping, got int"):
        from_public_checkpoint(3)
    with pytest.raises(TypeError, match="model must be one of ResNet, WideResNet"):
        public_key_map(create_model("mlp", 10))


def test_converted_teachers_join_a_teacher_bank():
    teachers = [from_public_checkpoint(read_fixture(a)[0]) for a in FAMILIES]
    x = read_fixture("resnet8")[1]
    out = TeacherBank(teachers)(x)
    for m, t in enumerate(teachers):
        with torch.no_grad(): assert rel_err(out.logits[m], t(x).logits) < 1e-5


def test_public_archs_are_zoo_models_with_repdistillers_parameter_counts():
    "Every public architecture is in the zoo; each layout's parameter count equals the zoo model's."
    assert set(PUBLIC_ARCHS) <= set(MODELS)
    for arch in PUBLIC_ARCHS:
        with torch.device("meta"): model = create_model(arch, 100)
        n = sum(math.prod(shape) for k, shape in LAYOUTS[arch]
                if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        assert n == sum(p.numel() for p in model.parameters()), arch


# ------------------------------------------------------------------------------------------------ kdbook run --teacher-weights
def test_kdbook_run_distils_from_public_checkpoint_files(tmp_path):
    "Two fixture teachers saved in RepDistiller's checkpoint format drive a study on a tiny CIFAR-10 archive in the real format."
    import subprocess, sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import write_cifar
    write_cifar(tmp_path / "data", "cifar10", archive=True)
    files = []
    for arch in ("resnet8", "wrn_16_1"):
        sd = read_fixture(arch)[0]
        torch.save({"epoch": 240, "model": sd, "best_acc": 0.0, "optimizer": {}}, tmp_path / f"{arch}.pth")
        files.append(str(tmp_path / f"{arch}.pth"))
    env = {**os.environ, "HOME": str(tmp_path / "home"), "KDBOOK_DATA": str(tmp_path / "data"),
           "KDBOOK_CACHE": str(tmp_path / "cache")}
    def run(*flags, out="out"):
        return subprocess.run([sys.executable, "-m", "kdbook.cli", "run", "--data", "cifar10", "--student", "resnet8",
                               "--methods", "aver,aekd", "--epochs", "1", "--seeds", "1", "--batch-size", "4",
                               "--out", str(tmp_path / out), *flags], capture_output=True, text=True, env=env, timeout=600)
    r = run("--teacher-weights", ",".join(files))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "epochs  loss" not in r.stdout and "training teacher" not in r.stdout   # no teacher trained (no bar, no line)
    assert "teachers: resnet8 " in r.stdout and "wrn_16_1 " in r.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(res["runs"]) == ["aekd/0", "aver/0", "student/0"]   # finished (on six test images: maybe "diverged")
    assert {v["status"] for v in res["runs"].values()} <= {"ok", "diverged"}
    assert [t["weights"] for t in res["teachers"]] == files and res["normalization"] == "dataset"
    # the teachers' accuracy is measured here, by an independent pass over the test split
    from kdbook.data import load_dataset
    ds = load_dataset("cifar10", root=tmp_path / "data")
    model = from_public_checkpoint(files[0]).eval()
    x = (ds.test.x.float() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    with torch.no_grad(): top1 = 100.0 * float((model(x).logits.argmax(1) == ds.test.y).float().mean())
    assert res["teachers"][0]["test_top1"] == pytest.approx(top1, abs=1e-6)
    # the run key holds the weights: other files (the same two, swapped) train again; the same files reuse
    again = run("--teacher-weights", ",".join(files))
    assert "reused 3 finished runs" in again.stdout, again.stdout
    swapped = run("--teacher-weights", ",".join(files[::-1]))
    assert swapped.returncode == 0 and "settings changed" in swapped.stdout
    # the normalisation is selectable and recorded
    rd = run("--teacher-weights", ",".join(files), "--normalization", "repdistiller", out="rd")
    assert rd.returncode == 0, rd.stderr
    assert json.loads((tmp_path / "rd" / "results.json").read_text())["normalization"] == "repdistiller"
    # bad combinations are one line each, before anything trains
    for flags, msg in ((["--teacher-weights", files[0], "--teachers", "resnet8,resnet8"], "one per file"),
                       (["--teacher-weights", str(tmp_path / "nope.pth")], "no such file"),
                       (["--teacher-weights", files[0], "--teachers", "vgg8"], "is not a repdistiller vgg8 checkpoint")):
        bad = run(*flags, out="bad")
        assert bad.returncode == 2 and msg in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
