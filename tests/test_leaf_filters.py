"""Leaf filters on PyTorch-style flat state_dict keys and Flax trees; noise.selected_leaves.

The key sets are written here from the models' published state_dict layouts (torchvision
ResNet-18, the CIFAR ResNet-18 of kuangliu/pytorch-cifar that uses ``shortcut``, VGG-11-BN,
Hugging Face BertForSequenceClassification), each key tagged with whether it is a weight
that weight noise should perturb.  Leaves are ShapeDtypeStructs: the filters read only
names, dtypes and ranks.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import noise

F32, I64 = np.float32, np.int64


def _bn(prefix, c, dtype_count=I64):
    return [(f"{prefix}.weight", (c,), F32, False), (f"{prefix}.bias", (c,), F32, False),
            (f"{prefix}.running_mean", (c,), F32, False), (f"{prefix}.running_var", (c,), F32, False),
            (f"{prefix}.num_batches_tracked", (), dtype_count, False)]


def resnet18_keys(container="downsample", head="fc", count_dtype=I64):
    """torchvision ResNet-18 (``downsample``, ``fc``) or the CIFAR variant (``shortcut``, ``linear``, 3x3 stem)."""
    stem = (64, 3, 7, 7) if container == "downsample" else (64, 3, 3, 3)
    keys = [("conv1.weight", stem, F32, True)] + _bn("bn1", 64, count_dtype)
    cin = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            keys += [(f"{p}.conv1.weight", (c, cin if block == 0 else c, 3, 3), F32, True)] + _bn(f"{p}.bn1", c, count_dtype)
            keys += [(f"{p}.conv2.weight", (c, c, 3, 3), F32, True)] + _bn(f"{p}.bn2", c, count_dtype)
            if block == 0 and stage > 1:
                keys += [(f"{p}.{container}.0.weight", (c, cin, 1, 1), F32, True)] + _bn(f"{p}.{container}.1", c, count_dtype)
        cin = c
    keys += [(f"{head}.weight", (1000 if head == "fc" else 10, 512), F32, True),
             (f"{head}.bias", (1000 if head == "fc" else 10,), F32, True)]
    return keys


def bert_keys(layers=2, ids_dtype=I64):
    """Hugging Face BertForSequenceClassification (``bert-base``, 2 of its 12 layers)."""
    keys = [("bert.embeddings.position_ids", (1, 512), ids_dtype, False),
            ("bert.embeddings.token_type_ids", (1, 512), ids_dtype, False),
            ("bert.embeddings.word_embeddings.weight", (30522, 768), F32, True),
            ("bert.embeddings.position_embeddings.weight", (512, 768), F32, True),
            ("bert.embeddings.token_type_embeddings.weight", (2, 768), F32, True),
            ("bert.embeddings.LayerNorm.weight", (768,), F32, False),
            ("bert.embeddings.LayerNorm.bias", (768,), F32, False)]
    for i in range(layers):
        p = f"bert.encoder.layer.{i}"
        for lin in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            keys += [(f"{p}.{lin}.weight", (768, 768), F32, True), (f"{p}.{lin}.bias", (768,), F32, True)]
        keys += [(f"{p}.attention.output.LayerNorm.weight", (768,), F32, False),
                 (f"{p}.attention.output.LayerNorm.bias", (768,), F32, False),
                 (f"{p}.intermediate.dense.weight", (3072, 768), F32, True), (f"{p}.intermediate.dense.bias", (3072,), F32, True),
                 (f"{p}.output.dense.weight", (768, 3072), F32, True), (f"{p}.output.dense.bias", (768,), F32, True),
                 (f"{p}.output.LayerNorm.weight", (768,), F32, False), (f"{p}.output.LayerNorm.bias", (768,), F32, False)]
    keys += [("bert.pooler.dense.weight", (768, 768), F32, True), ("bert.pooler.dense.bias", (768,), F32, True),
             ("classifier.weight", (2, 768), F32, True), ("classifier.bias", (2,), F32, True)]
    return keys


def vgg11_bn_keys():
    """torchvision VGG-11-BN: BatchNorms at odd ``features`` indices, named by index only."""
    keys, i, cin = [], 0, 3
    for c in (64, 128, 256, 256, 512, 512, 512, 512):
        keys += [(f"features.{i}.weight", (c, cin, 3, 3), F32, True), (f"features.{i}.bias", (c,), F32, True)]
        keys += _bn(f"features.{i + 1}", c)
        i, cin = i + 3, c
    keys += [("classifier.0.weight", (4096, 25088), F32, True), ("classifier.0.bias", (4096,), F32, True)]
    return keys


def _tree(keys):
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, shape, dtype, _ in keys}


def _check(keys, leaf_filter=noise.default_leaf_filter):
    rows = noise.selected_leaves(_tree(keys), leaf_filter)
    expected = {k: want for k, _, _, want in keys}
    wrong = [(r.name, r.selected, r.reason) for r in rows if r.selected != expected[r.name]]
    assert not wrong, wrong
    for r in rows:
        assert r.selected or r.reason, f"{r.name}: skipped without a reason"
    return rows


@pytest.mark.parametrize("container,head", [("downsample", "fc"), ("shortcut", "linear")])
@pytest.mark.parametrize("count_dtype", [I64, F32])  # F32: a state_dict converted wholesale to float32
def test_resnet18_state_dict(container, head, count_dtype):
    rows = _check(resnet18_keys(container, head, count_dtype))
    assert sum(r.selected for r in rows) == 22  # 17 convolutions, 3 projection convolutions, the head weight and bias
    assert any(r.name.endswith(f"{container}.1.weight") and r.reason.startswith("BatchNorm of a Conv-BN pair") for r in rows)


@pytest.mark.parametrize("ids_dtype", [I64, F32])
def test_bert_state_dict(ids_dtype):
    rows = _check(bert_keys(ids_dtype=ids_dtype))
    reasons = {r.name: r.reason for r in rows}
    assert reasons["bert.embeddings.LayerNorm.weight"] == "normalization (LayerNorm)"
    if ids_dtype == F32:
        assert reasons["bert.embeddings.position_ids"] == "buffer (position_ids)"


def test_nested_torch_names_and_flax_names():
    nested = {"layer1": {"0": {"bn1": {"weight": jnp.ones(4)}, "conv1": {"weight": jnp.ones((4, 4, 3, 3))}}},
              "shortcut": {"1": {"bias": jnp.ones(4)}, "0": {"weight": jnp.ones((4, 4, 1, 1))}}}
    sel = {r.name: r.selected for r in noise.selected_leaves(nested)}
    assert sel == {"layer1/0/bn1/weight": False, "layer1/0/conv1/weight": True, "shortcut/1/bias": False, "shortcut/0/weight": True}
    flax = {"params": {"Conv_0": {"kernel": jnp.ones((3, 1, 4))}, "BatchNorm_0": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
                       "LayerNorm_0": {"scale": jnp.ones(4)}, "Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}},
            "batch_stats": {"BatchNorm_0": {"mean": jnp.ones(4), "var": jnp.ones(4)}}}
    picked = [r.name for r in noise.selected_leaves(flax) if r.selected]
    assert picked == ["params/Conv_0/kernel", "params/Dense_0/bias", "params/Dense_0/kernel"]
    # the new rules do not touch weights that merely contain the letters (e.g. "linear", "bnorm" is a norm)
    assert noise.default_leaf_filter((jax.tree_util.DictKey("linear.weight"),), jnp.ones((2, 2)))
    assert noise.default_leaf_filter((jax.tree_util.DictKey("downsample.0.weight"),), jnp.ones((2, 2)))
    assert not noise.default_leaf_filter((jax.tree_util.DictKey("transformer.ln_f.weight"),), jnp.ones(2))


def test_names_alone_miss_indexed_batchnorm_the_tree_aware_filter_does_not():
    """Limit of the name rule (documented): VGG-BN's features.1 is a BatchNorm by position only."""
    keys = vgg11_bn_keys()
    rows = noise.selected_leaves(_tree(keys))
    missed = sorted(r.name for r in rows if r.selected and not dict((k, w) for k, *_, w in keys)[r.name])
    assert missed == sorted(k for k, *_ in keys if re.fullmatch(r"features\.\d+\.(weight|bias)", k) and
                            int(k.split(".")[1]) % 3 == 1)
    filt = noise.state_dict_leaf_filter(_tree(keys))
    _check(keys, filt)
    _check(resnet18_keys(), noise.state_dict_leaf_filter(_tree(resnet18_keys())))
    _check(bert_keys(), noise.state_dict_leaf_filter(_tree(bert_keys())))
    assert hash(filt) == hash(noise.state_dict_leaf_filter(_tree(keys)))  # usable as a static field


def test_weight_noise_on_a_torch_state_dict_leaves_bn_alone():
    keys = [("conv1.weight", (4, 3, 3, 3)), ("bn1.weight", (4,)), ("bn1.running_var", (4,)),
            ("layer2.0.shortcut.0.weight", (4, 4, 1, 1)), ("layer2.0.shortcut.1.weight", (4,)), ("fc.weight", (2, 4))]
    sd = {k: jnp.ones(s) for k, s in keys}
    noisy = noise.add_weight_noise(sd, 0.0, key=jax.random.key(0), reference="power")
    for k, _ in keys:
        changed = not np.array_equal(np.asarray(noisy[k]), np.asarray(sd[k]))
        assert changed == (k in ("conv1.weight", "layer2.0.shortcut.0.weight", "fc.weight")), k


def leaf_filter_table(keys, leaf_filter=noise.default_leaf_filter):
    """Rows ``(key pattern, count, perturbed, reason)``: keys with block indices replaced by ``N`` (for reports)."""
    groups = {}
    for r in noise.selected_leaves(_tree(keys), leaf_filter):
        pattern = re.sub(r"(?<=layer\.)\d+|(?<=layer\d\.)\d+", "N", r.name)
        g = groups.setdefault((pattern, r.selected, r.reason), 0)
        groups[(pattern, r.selected, r.reason)] = g + 1
    return [(p, n, sel, reason) for (p, sel, reason), n in groups.items()]


def test_cli_lists_what_weight_noise_perturbs(tmp_path, capsys):
    from noisejax import cli

    path = tmp_path / "sd.npz"
    np.savez(path, **{"conv1.weight": np.ones((4, 3, 3, 3), np.float32), "bn1.weight": np.ones(4, np.float32),
                      "bn1.num_batches_tracked": np.array(3), "layer2.0.shortcut.1.weight": np.ones(4, np.float32),
                      "features.1.weight": np.ones(4, np.float32), "features.1.running_var": np.ones(4, np.float32),
                      "fc.weight": np.ones((2, 4), np.float32)})
    assert cli.main(["leaves", str(path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert " yes " in lines["conv1.weight"] and " yes " in lines["fc.weight"]
    assert "normalization (bn1)" in lines["bn1.weight"] and "not floating point" in lines["bn1.num_batches_tracked"]
    assert "Conv-BN pair (shortcut.1)" in lines["layer2.0.shortcut.1.weight"]
    assert " yes " in lines["features.1.weight"]  # names alone: a limit ...
    assert out.splitlines()[-1] == "weight noise perturbs 3 of 7 leaves (120 of 133 values)"
    assert cli.main(["leaves", str(path), "--filter", "state-dict"]) == 0  # ... the tree-aware filter lifts
    out = capsys.readouterr().out
    assert "normalization module features.1" in out and out.splitlines()[-1].startswith("weight noise perturbs 2 of 7")
    assert cli.main(["leaves", str(tmp_path / "missing.npz")]) == 2
    assert "PARAMS file not found" in capsys.readouterr().err
