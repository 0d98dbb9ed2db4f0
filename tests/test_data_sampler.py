"""The split-modality, length-grouped order of unpacked SFT rows equals the original's
SplitModalitySampler (re-written here with torch as the reference), and the loader serves it."""
import json
import math
import os

import numpy as np
import pytest
import torch

from oq2vl_jax.data import pack
from oq2vl_jax.data.loader import LoaderConfig, make_train_iterator
from oq2vl_jax.data.sampler import modality_length_order
from oq2vl_jax.data.tokenizer import build_tiny_tokenizer


def reference_order(modality_lengths, g_bsz, replicas, seed, epoch=0, rank=None):
    """SplitModalitySampler.__iter__ (prismatic batching_utils) with torch's generator, except that
    the longest-batch search adds no 24*24 to image rows: our lengths already count image tokens."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    mm = [(i, n) for i, (m, n) in enumerate(modality_lengths) if m]
    uni = [(i, n) for i, (m, n) in enumerate(modality_lengths) if not m]

    def side(pairs):
        idx, lens = ([p[0] for p in pairs], [p[1] for p in pairs])
        perm = torch.randperm(len(idx), generator=g)
        batches = [perm[i:i + g_bsz].tolist() for i in range(0, len(perm), g_bsz)]
        if batches and len(batches[-1]) < g_bsz:
            batches[-1].extend(batches[0][:g_bsz - len(batches[-1])])
        out = []
        for b in batches:
            b = sorted(b, key=lambda i: lens[i], reverse=True)
            per = len(b) // replicas
            buckets, totals = [[] for _ in range(replicas)], [0 for _ in range(replicas)]
            for i in b:  # reindex_batch
                k = totals.index(min(totals))
                buckets[k].append(i)
                totals[k] += lens[i]
                if len(buckets[k]) == per:
                    totals[k] = float("inf")
            out.append([idx[i] for bucket in buckets for i in bucket])
        return out

    merged = side(mm) + side(uni)
    batches = [merged[i] for i in torch.randperm(len(merged), generator=g)]
    longest = int(np.argmax([max(modality_lengths[i][1] for i in b) for b in batches]))
    batches[0], batches[longest] = batches[longest], batches[0]
    flat = [i for b in batches for i in b]
    if rank is None:
        return flat
    per_replica = g_bsz // replicas
    return torch.as_tensor(flat).reshape(-1, per_replica)[rank::replicas].flatten().tolist()


@pytest.mark.parametrize("n,frac_mm,g_bsz,replicas", [(203, 0.8, 16, 4), (50, 1.0, 8, 2), (37, 0.3, 6, 3)])
def test_modality_length_order_equals_the_original_sampler(n, frac_mm, g_bsz, replicas):
    rng = np.random.default_rng(n)
    ml = [(bool(rng.random() < frac_mm), int(rng.integers(10, 900))) for _ in range(n)]
    g = torch.Generator()
    g.manual_seed(7)
    ours = modality_length_order([m for m, _ in ml], [x for _, x in ml], g_bsz, replicas,
                                 lambda k: torch.randperm(k, generator=g).tolist()).tolist()
    assert ours == reference_order(ml, g_bsz, replicas, seed=7)
    # Every global batch is one modality; every row is used; replica r's contiguous parts are the
    # original's rank-r indices.
    for b in range(0, len(ours), g_bsz):
        assert len({ml[i][0] for i in ours[b:b + g_bsz]}) == 1
    assert set(ours) == set(range(n)) and len(ours) % g_bsz == 0
    per = g_bsz // replicas
    for r in range(replicas):
        mine = [ours[i] for i in range(len(ours)) if (i // per) % replicas == r]
        assert mine == reference_order(ml, g_bsz, replicas, seed=7, rank=r)


def test_loader_serves_one_modality_per_global_batch(tmp_path):
    tok = str(tmp_path / "tok")
    build_tiny_tokenizer(["a red circle on a blue background", "What shape is it?"] * 5, tok, vocab_size=280)
    from PIL import Image
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "a.png")
    convs = []
    for i in range(22):
        q = "What shape is it? " * (1 + i % 4)
        img = i % 3 != 0
        convs.append({"conversations": [{"from": "human", "value": ("<image>\n" if img else "") + q},
                                        {"from": "gpt", "value": "a red circle"}], **({"image": "a.png"} if img else {})})
    (tmp_path / "sft.json").write_text(json.dumps(convs))
    out = str(tmp_path / "rows")
    pack.run(pack.PackConfig(tokenizer=tok, out=out, mode="sft", seq_len=256, image_tokens=3, image_size=8,
                             packing="none"), [str(tmp_path / "sft.json")], log=lambda m: None)
    info = np.load(os.path.join(out, "sft.rowinfo.npy"))
    assert info.shape == (22, 2) and (info[:, 1] > 0).sum() == 14
    cfg = LoaderConfig(sources=((out, 1.0),), batch_size=2, seq_len=256, max_images=1, image_size=8, seed=1,
                       mode="unpacked_sft", sampler="modality_length", group_rows=1)
    per_process = [make_train_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    epoch = math.ceil(14 / 4) * 4 + math.ceil(8 / 4) * 4
    seen = []
    for _ in range(epoch // 4):
        batches = [next(it) for it in per_process]
        has_img = [m for b in batches for m in b["image_mask"][:, 0]]
        assert len(set(has_img)) == 1  # the global batch (both processes) is one modality
        seen += [b["input_ids"][i].tobytes() for b in batches for i in range(2)]
    rows = pack_rows(out)
    assert {r for r in rows} == set(seen)  # an epoch serves every row
    state = per_process[0].get_state()
    nxt = next(per_process[0])
    again = make_train_iterator(cfg, process_index=0, process_count=2)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["input_ids"], nxt["input_ids"])


def pack_rows(out):
    from array_record.python.array_record_module import ArrayRecordReader

    from oq2vl_jax.data.records import decode_row
    r = ArrayRecordReader(os.path.join(out, "sft.array_record"))
    rows = [decode_row(r.read())["input_ids"].tobytes() for _ in range(r.num_records())]
    r.close()
    return rows
