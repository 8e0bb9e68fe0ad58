"""Subprocess worker for tests/test_portable.py: a tiny training run that dumps the params
it holds (gathered from every process), and the consumers that load its work dir.

    python tests/portable_worker.py train WORKDIR MESH_FSDP
    python tests/portable_worker.py eval|init_from OUT.npz WORKDIR...
"""

import sys
from pathlib import Path

import numpy as np


def flat(params) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v, np.float32)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}


def tiny_config(workdir: str, fsdp: int = 1):
    from soft_jax.train.run_config import default_config

    c = default_config()
    c.workdir = workdir
    c.exits = (2, 3)
    c.total_steps, c.checkpoint_every, c.log_every = 2, 2, 1
    c.batch_size = 4
    c.data.max_rows, c.data.seq_len, c.data.tokenizer = 16, 192, "bpe:300"
    c.data.eval_source = ""
    c.mesh.fsdp = fsdp
    return c


def train_and_dump(workdir: str, fsdp: int) -> None:
    import jax
    from jax.experimental import multihost_utils

    from soft_jax.train.loop import train

    r = train(tiny_config(workdir, fsdp))
    params = multihost_utils.process_allgather(r["params"], tiled=True)
    if jax.process_index() == 0:
        np.savez(Path(workdir) / "trained.npz", **flat(params))


def consume(kind: str, out: str, workdirs: list[str]) -> None:
    import jax

    assert jax.device_count() == 1, jax.devices()
    got = {}
    for i, w in enumerate(workdirs):
        if kind == "eval":
            from soft_jax.eval.runner import open_model

            params = open_model({"ckpt": w}, "model", "config").params
        else:  # a new run starting from the work dir's checkpoint
            from soft_jax.parallel import sharding as shd
            from soft_jax.train.loop import build_model

            c = tiny_config(w + "-next")
            c.model.init_from = w
            params = build_model(c, 300, shd.build_mesh({"data": 1}))[1]
        got.update({f"{i}{k}": v for k, v in flat(params).items()})
    np.savez(out, **got)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_and_dump(sys.argv[2], int(sys.argv[3]))
    else:
        consume(sys.argv[1], sys.argv[2], sys.argv[3:])
